"""Tokenizer folders as edgediff 0.1 bundles copied them, turned into the canonical form in memory.

Used only for migrated version-1 manifests (edgediff/migrate.py), and never writes to the bundle. Such a folder
holds what the source checkpoint shipped: `vocab.json` + `merges.txt` (built into a backend the way transformers
5.x builds `CLIPTokenizer`, models/clip/tokenization_clip.py) or a `tokenizer.json` without padding, and the
`tokenizer_config.json` / `special_tokens_map.json` that name the special tokens. Those are read with
transformers' precedence, which matters in practice: SD 2.x, SD-Turbo and SDXL's second tokenizer pad with "!",
and because transformers registers every named special token as an added token, a "!" typed in a prompt is then
encoded as that bare token (id 0) rather than merged by BPE ("wow!!" -> wow, !, ! instead of wow, !!). We keep that
quirk: the text encoders are run, and compared, with what diffusers feeds them. Exports since format version 2
write the finished tokenizer.json instead (export/tokenizer.py), produced by transformers itself.

Runtime module: imports `tokenizers`, never transformers or torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the order in which named tokens are registered (and so get new ids).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# The v5 CLIPTokenizer pattern (the older converter lacked the two special-token alternatives; since added
# tokens are split off before pre-tokenization, both give the same ids).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def from_legacy_files(folder: str | Path, max_length: int) -> Tokenizer:
    """The canonical tokenizer (special tokens registered, padded and truncated to `max_length`) of a v1 folder:
    `tokenizer.json`, else `vocab.json` + `merges.txt`, with its configs where present."""
    folder = Path(folder)
    tokenizer_json, vocab, merges = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    from_json = tokenizer_json.is_file()
    if not from_json and not (vocab.is_file() and merges.is_file()):
        raise FileNotFoundError(
            f"no tokenizer in {folder}: looked for tokenizer.json, or vocab.json + merges.txt"
            + ("" if folder.is_dir() else " (the folder does not exist)")
        )
    try:
        special, extra_tokens, config = _read_special_tokens(folder)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    if from_json:
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tokenizer_json}: not a valid tokenizers file ({e})") from None
        # CLIP's names stand in only where the file has them: a word-level vocabulary may have none.
        for key, default in CLIP_DEFAULTS.items():
            if key not in special and tokenizer.token_to_id(default) is not None:
                special[key] = default
        if "pad_token" not in special and tokenizer.padding:
            special["pad_token"] = tokenizer.padding["pad_token"]
    else:
        special = {**CLIP_DEFAULTS, **special}
        tokenizer = _clip_bpe(vocab, merges, _content(special["unk_token"]))
    _register_special_tokens(tokenizer, extra_tokens, special)
    names = {key: _content(token) for key, token in special.items()}
    if not from_json:
        tokenizer.post_processor = processors.RobertaProcessing(
            (names["eos_token"], _require_id(tokenizer, names["eos_token"], "eos_token")),
            (names["bos_token"], _require_id(tokenizer, names["bos_token"], "bos_token")),
            trim_offsets=False,
            add_prefix_space=False,
        )
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    if "pad_token" not in names:
        raise ValueError(f"{folder}: no pad token; set pad_token in tokenizer_config.json")
    pad_id = _require_id(tokenizer, names["pad_token"], "pad_token")
    tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=names["pad_token"],
                             length=max_length)
    return tokenizer


def _clip_bpe(vocab: Path, merges: Path, unk_token: str) -> Tokenizer:
    """The backend of transformers 5.x `CLIPTokenizer.__init__`, less its post-processor (set once ids are known)."""
    try:
        model = BPE.from_file(
            str(vocab),
            str(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk_token,
        )
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"cannot read {vocab} + {merges.name} as a BPE vocabulary ({e})") from None
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_special_tokens(folder: Path) -> tuple[dict[str, Any], list[AddedToken], dict[str, Any]]:
    """Named special tokens (str or AddedToken), the config's added tokens and the config, as transformers reads them.

    special_tokens_map.json overrides tokenizer_config.json, but only for configs without `added_tokens_decoder`
    (the newer format, where transformers ignores the map): SD 2.x ships pad "<|endoftext|>" in one and "!" in
    the other, and pads with "!".
    """
    config = _read_json(folder / "tokenizer_config.json")
    decoder = config.get("added_tokens_decoder")
    special = {key: _config_token(config[key]) for key in SPECIAL_TOKEN_KEYS if config.get(key)}
    if decoder is None:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in SPECIAL_TOKEN_KEYS and value:
                special[key] = _config_token({**value, "special": True} if isinstance(value, dict) else value)
    extra = [_added_token(props) for _, props in sorted((decoder or {}).items(), key=lambda item: int(item[0]))]
    by_content = {token.content: token for token in extra}
    special = {key: by_content.get(_content(value), value) for key, value in special.items()}
    return special, extra, config


def _register_special_tokens(tokenizer: Tokenizer, extra: list[AddedToken], special: dict[str, Any]) -> None:
    """Add the tokens transformers' TokenizersBackend.__init__ adds, in its order and with its dedup rules.

    Those rules decide the flags a token ends up with: the tokenizers library lets the last registration of a
    content win, and transformers compares named tokens by all flags, so SD 1.x's eos/unk dicts (normalized=True)
    are superseded by the plain-string pad "<|endoftext|>" (normalized=False): "<|ENDOFTEXT|>" stays text.
    """
    existing = list(tokenizer.get_added_tokens_decoder().values())
    existing_reprs = {repr(token) for token in existing}
    to_add: list[Any] = [token for token in extra if repr(token) not in existing_reprs]
    registered = {token.content for token in existing} | {token.content for token in to_add}
    for key in SPECIAL_TOKEN_KEYS:
        value = special.get(key)
        if value is not None and _content(value) not in registered and value not in to_add:
            to_add.append(value)
    named = {_content(value) for value in special.values()}
    tokens = []
    for token in to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)  # normalized defaults to False for special tokens
        elif not token.special and token.content in named:
            token = AddedToken(**_token_props(token), special=True)
        tokens.append(token)
    if tokens:
        tokenizer.add_tokens(tokens)


def _config_token(value: Any) -> str | AddedToken:
    """A token as a config spells it: a string, or a dict of AddedToken fields (with or without "__type")."""
    return value if isinstance(value, str) else _added_token(value)


def _added_token(value: Any) -> AddedToken:
    """An AddedToken from a dict of its fields (with or without "__type"), as `added_tokens_decoder` holds them."""
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ValueError(f"a special token must be a string or an AddedToken object, found {value!r}")
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(value["content"], **{k: bool(value[k]) for k in flags if k in value})


def _token_props(token: AddedToken) -> dict[str, Any]:
    return {
        "content": token.content,
        "single_word": token.single_word,
        "lstrip": token.lstrip,
        "rstrip": token.rstrip,
        "normalized": token.normalized,
    }


def _content(value: str | AddedToken) -> str:
    return value if isinstance(value, str) else value.content


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} should hold a JSON object, not {type(data).__name__}")
    return data


def _require_id(tokenizer: Tokenizer, token: str, role: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
    return token_id
