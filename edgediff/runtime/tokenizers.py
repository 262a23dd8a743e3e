"""Tokenization on the `tokenizers` library alone, from a bundle's canonical `tokenizer.json`.

The export writes each tokenizer as transformers runs it for the text encoder: added tokens registered, padding
and truncation to the model's length included (export/tokenizer.py), so the runtime loads the file as it is and
gets transformers' ids (CLIP BPE, the built-in word model, any fast tokenizer). Bundles exported before that
(format version 1) are converted in memory by runtime/legacy_tokenizer.py, the only code that knows their files.

Runtime module: imports numpy and `tokenizers`, never transformers or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..bundle import BundleError

TOKENIZER_FILE = "tokenizer.json"
# A word split by truncation is reported whole when its kept part is at most this many characters.
_MAX_REPORTED_KEPT = 24


@dataclass(frozen=True)
class TokenizedBatch:
    """`input_ids` int64 [batch, max_length]; `dropped[i]` is the prompt text cut off by truncation, or ""."""

    input_ids: np.ndarray
    dropped: list[str]


def open_tokenizer(folder: str | Path, max_length: int, *, legacy: bool = False) -> ClipTokenizer:
    """A manifest's tokenizer folder; `legacy`: a migrated version-1 bundle's files, converted in memory.
    BundleError (one line) where the files are missing or not a tokenizer."""
    try:
        if legacy:
            from .legacy_tokenizer import from_legacy_files

            return ClipTokenizer(from_legacy_files(folder, max_length), max_length=max_length)
        return ClipTokenizer.from_file(Path(folder) / TOKENIZER_FILE, max_length=max_length)
    except (OSError, ValueError) as e:
        raise BundleError(f"{e}; re-export the bundle") from None


class ClipTokenizer:
    """A canonical tokenizer: pads and truncates to one fixed length, as transformers does with
    padding="max_length", truncation=True. Overflow is kept, so that `dropped` and `unknown_words` can see the
    cut-off tokens."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int | None = None):
        padding, truncation = tokenizer.padding, tokenizer.truncation
        if not padding or not padding.get("length") or not truncation:
            raise ValueError("not a canonical tokenizer (it must pad to a fixed length and truncate)")
        length = padding["length"]
        if truncation["max_length"] != length or (max_length is not None and max_length != length):
            raise ValueError(f"tokenizer pads to {length} and truncates to {truncation['max_length']}, the "
                             f"manifest says {max_length}")
        self._tok = tokenizer
        self._max_length = int(length)
        self._pad_id = int(padding["pad_id"])
        unk = getattr(tokenizer.model, "unk_token", None)
        self._unk_id = tokenizer.token_to_id(unk) if unk else None
        self._bos_id, self._eos_id = _template_ends(tokenizer)

    @classmethod
    def from_file(cls, path: str | Path, *, max_length: int | None = None) -> ClipTokenizer:
        """Load a canonical tokenizer.json; ValueError (one line) if it is missing or not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer file")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"{path}: not a valid tokenizers file ({first})") from None
        try:
            return cls(tokenizer, max_length=max_length)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: list[str]) -> TokenizedBatch:
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a str; wrap the prompt in a list")
        # One encode per prompt: batches here are small, and this keeps the Rust thread pool (and its
        # fork warning) out of the picture.
        encodings = [self._tok.encode(prompt) for prompt in prompts]
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), self._max_length)
        dropped = [_dropped_text(prompt, e) for prompt, e in zip(prompts, encodings, strict=True)]
        return TokenizedBatch(input_ids=ids, dropped=dropped)

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` that map to the unknown token, each once, in order (CLIP's byte-level BPE has none)."""
        if self._unk_id is None:
            return []
        unk = self._tok.id_to_token(self._unk_id)
        encoding = self._tok.encode(prompt)
        spans = _word_spans(encoding)
        found: dict[str, None] = {}  # insertion-ordered set
        for part in (encoding, *encoding.overflowing):
            offsets, words, special = part.offsets, part.word_ids, part.special_tokens_mask
            for i, token_id in enumerate(part.ids):
                start, end = offsets[i]
                # Skip the template's tokens and the unknown token typed out as such (CLIP's is "<|endoftext|>").
                if token_id != self._unk_id or special[i] or prompt[start:end] == unk:
                    continue
                word = words[i]
                if word is not None:
                    start, end = spans.get(word, (start, end))
                found.setdefault(prompt[start:end])
        return list(found)


def _template_ends(tokenizer: Tokenizer) -> tuple[int | None, int | None]:
    """The ids the post-processor puts before and after a text (CLIP: <|startoftext|>, <|endoftext|>)."""
    padding = tokenizer.padding
    tokenizer.no_padding()
    try:
        encoding = tokenizer.encode("a")
    finally:
        tokenizer.enable_padding(**(padding or {}))
    ids, special = encoding.ids, encoding.special_tokens_mask
    bos = ids[0] if ids and special[0] else None
    eos = ids[-1] if len(ids) > 1 and special[-1] else None
    return bos, eos


def _dropped_text(prompt: str, encoding: Encoding) -> str:
    """The prompt from the first word that lost a token to truncation.

    A word cut in two is reported whole, unless it is a long unspaced run (CJK text is one "word" to CLIP's
    pre-tokenizer): then the report starts at the cut, after an ellipsis, rather than repeat what was kept.
    """
    for part in encoding.overflowing:
        for i, is_special in enumerate(part.special_tokens_mask):
            if not is_special:
                cut = part.offsets[i][0]
                word = part.word_ids[i]
                start = _word_spans(encoding)[word][0] if word is not None else cut
                if cut - start > _MAX_REPORTED_KEPT:
                    return "…" + prompt[cut:].strip()
                return prompt[start:].strip()
    return ""


def _word_spans(encoding: Encoding) -> dict[int, tuple[int, int]]:
    """Character span of each pre-tokenizer word of a (possibly truncated) encoding: word ids are global across
    the kept tokens and the overflow, so a word cut in two gets its whole span."""
    spans: dict[int, tuple[int, int]] = {}
    for piece in (encoding, *encoding.overflowing):
        for word, (start, end) in zip(piece.word_ids, piece.offsets, strict=True):
            if word is not None:
                known = spans.get(word)
                spans[word] = (min(start, known[0]), max(end, known[1])) if known else (start, end)
    return spans
