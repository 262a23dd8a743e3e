"""The source's tokenizer -> the bundle's canonical `tokenizer.json`, which the runtime loads as it is.

transformers loads the source folder (whatever it ships: vocab.json + merges.txt, a tokenizer.json, configs that
name special tokens, SD 2.x's "!" padding) and so decides which tokens are added and how they match; its fast
backend is then saved with the padding and truncation transformers applies for the text encoder
(padding="max_length", truncation=True, max_length=model_max_length). Nothing of transformers' own reading has to
be re-created at run time.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import SourceError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 77  # CLIP's; transformers writes 1e30 ("no limit") into configs that had none
_NO_LIMIT = 10**20


def save_canonical_tokenizer(source: Path, out: Path, class_name: str | None = None,
                             max_length: int | None = None) -> int:
    """Write `out`/tokenizer.json from the tokenizer folder `source` (loaded as `class_name`, the pipeline's
    model_index entry, else AutoTokenizer); returns the length it pads and truncates to: `max_length` where the
    pipeline sets it (T5's max_sequence_length), else the tokenizer's own."""
    import transformers

    cls = getattr(transformers, class_name or "", None) or transformers.AutoTokenizer
    try:
        tok = cls.from_pretrained(source)
        backend = tok.backend_tokenizer
    except (OSError, ValueError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SourceError(f"{source}: no fast tokenizer transformers can load ({first})") from None
    length = tok.model_max_length
    if max_length is None:
        max_length = length if isinstance(length, int) and 0 < length < _NO_LIMIT else DEFAULT_MAX_LENGTH
    if tok.pad_token_id is None:
        raise SourceError(f"{source}: the tokenizer has no pad token; set pad_token in tokenizer_config.json")
    backend.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
    backend.enable_padding(direction="right", pad_id=tok.pad_token_id, pad_type_id=0, pad_token=str(tok.pad_token),
                           length=max_length)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / TOKENIZER_FILE))
    return max_length
