"""Tokenizers: ids equal to transformers' CLIPTokenizer on awkward prompts, by both routes into the runtime: the
canonical tokenizer.json the export writes (loaded as it is), and a v1 bundle's folder converted in memory
(configs read with transformers' precedence); dropped text and unknown words."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgediff.migrate import _folder_max_length
from edgediff.runtime.legacy_tokenizer import from_legacy_files
from edgediff.runtime.tokenizers import ClipTokenizer, TokenizedBatch

CLIP_DIR = Path(__file__).resolve().parents[2] / "shared/data/clip-tokenizer"
needs_clip = pytest.mark.skipif(not (CLIP_DIR / "vocab.json").is_file(), reason=f"no CLIP vocabulary at {CLIP_DIR}")

BOS, EOS = 49406, 49407
WORDS = ["a", "photo", "of", "cat", "red", "dog"]  # one token each
LONG_WORDS = [WORDS[i % len(WORDS)] for i in range(120)]

PROMPTS = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO OF A CAT, HIGHLY DETAILED",
    "don't stop; it's what we're doing, I'M sure they'll've",
    "rock ’n’ roll — “quoted” text…",
    "price: $1,299.99 (50% off!) #1 @home & co.",
    "1024x768 4k 8K uhd 3.14159 2nd 21st",
    "wow!! amazing! really!!!",
    "multiple     spaces\tand\ttabs\nand\r\nnewlines\n\n",
    "Café, naïve façade, Ångström, Cafe\u0301 (decomposed)",
    "東京の夜景、ネオン、雨",
    "一只可爱的猫坐在窗台上",
    "Москва зимой, снег",
    "مدينة في الليل",
    "ελληνικά γράμματα",
    "🐱🐶 cat and dog 👩‍🚀 astronaut 🇯🇵 flag",
    "hello<|endoftext|>world <|startoftext|> x",
    "a <|ENDOFTEXT|> in capitals",
    "(masterpiece:1.2), [[best quality]], {ultra-detailed}",
    "snake_case and kebab-case and CamelCase words",
    "https://example.com/path?q=1&x=y",
    "email me at someone@example.org",
    "tab\tseparated\tvalues",
    "ß ẞ İstanbul ǅ ﬁ ligature",
    "zero\u200bwidth\u00a0nbsp",
    " ".join(LONG_WORDS),
    " ".join(["photorealistic"] * 60),
    "東京" * 100,
    "an astronaut riding a horse on mars, trending on artstation, octane render, 8k, " * 4,
]


def _copy_clip(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(CLIP_DIR / name, folder / name)
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def canonical(folder: Path, out: Path) -> ClipTokenizer:
    """The export's route: transformers reads the source folder, the runtime loads the tokenizer.json written."""
    pytest.importorskip("transformers")
    from edgediff.export.tokenizer import save_canonical_tokenizer

    length = save_canonical_tokenizer(folder, out, "CLIPTokenizer")
    return ClipTokenizer.from_file(out / "tokenizer.json", max_length=length)


def legacy(folder: Path) -> ClipTokenizer:
    """A v1 bundle's route: the folder as 0.1 copied it, converted in memory at load."""
    return ClipTokenizer(from_legacy_files(folder, _folder_max_length(folder)))


def load(route: str, folder: Path, tmp_path: Path) -> ClipTokenizer:
    return canonical(folder, tmp_path / "canonical") if route == "canonical" else legacy(folder)


ROUTES = pytest.mark.parametrize("route", ["canonical", "legacy"])


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> ClipTokenizer:
    return canonical(CLIP_DIR, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def hf_clip():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer


def _hf_ids(hf_tokenizer, prompts: list[str]) -> np.ndarray:
    out = hf_tokenizer(prompts, padding="max_length", max_length=77, truncation=True)
    return np.array(out["input_ids"], dtype=np.int64)


@needs_clip
def test_known_ids(clip):
    batch = clip.encode(["a photo of a cat"])
    assert isinstance(batch, TokenizedBatch)
    assert batch.input_ids.dtype == np.int64 and batch.input_ids.shape == (1, 77)
    expected = [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70
    assert batch.input_ids[0].tolist() == expected
    assert batch.dropped == [""]
    assert (clip.max_length, clip.pad_id, clip.bos_id, clip.eos_id, clip.vocab_size) == (77, EOS, BOS, EOS, 49408)


@needs_clip
@ROUTES
def test_parity_with_transformers(hf_clip, route, tmp_path):
    hf = hf_clip.from_pretrained(CLIP_DIR)
    ours = load(route, CLIP_DIR, tmp_path).encode(PROMPTS).input_ids
    theirs = _hf_ids(hf, PROMPTS)
    for prompt, a, b in zip(PROMPTS, ours, theirs):
        assert a.tolist() == b.tolist(), prompt


@needs_clip
@ROUTES
def test_parity_pad_exclamation(tmp_path, hf_clip, route):
    folder = _copy_clip(tmp_path / "tok", model_max_length=77, pad_token="!")
    ours = load(route, folder, tmp_path)
    assert ours.pad_id == 0 and ours.eos_id == EOS
    assert ours.encode(["a cat"]).input_ids[0].tolist() == [BOS, 320, 2368, EOS] + [0] * 73
    np.testing.assert_array_equal(ours.encode(PROMPTS).input_ids, _hf_ids(hf_clip.from_pretrained(folder), PROMPTS))


@needs_clip
@ROUTES
def test_exclamation_is_split_off_when_it_pads(tmp_path, clip, route):
    # transformers registers the pad token as an added token, so "!!" stops being one BPE token: kept for parity.
    bang = load(route, _copy_clip(tmp_path / "tok", pad_token="!"), tmp_path)
    assert clip.encode(["wow!!"]).input_ids[0, :4].tolist() == [BOS, 2781, 748, EOS]
    assert bang.encode(["wow!!"]).input_ids[0, :5].tolist() == [BOS, 2781, 0, 0, EOS]


SD15_TOKEN = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


@needs_clip
@ROUTES
@pytest.mark.parametrize("layout", ["sd15", "sd2", "added_tokens_decoder"])
def test_checkpoint_config_layouts(tmp_path, hf_clip, layout, route):
    folder = tmp_path / layout
    special = {key: {**SD15_TOKEN, "content": "<|endoftext|>"} for key in ("eos_token", "unk_token")}
    config = {"model_max_length": 77, "bos_token": {**SD15_TOKEN, "content": "<|startoftext|>"}, **special}
    config["pad_token"] = "<|endoftext|>"
    if layout == "added_tokens_decoder":  # the newer save format: the map is ignored, "!" pads
        entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config["pad_token"] = "!"
        config["added_tokens_decoder"] = {
            str(i): {**entry, "content": c} for i, c in ((0, "!"), (BOS, "<|startoftext|>"), (EOS, "<|endoftext|>"))
        }
    _copy_clip(folder, **config)
    if layout != "sd15":  # SD 2.x: the map says "!" and wins over the config (unless added_tokens_decoder)
        token_map = {"pad_token": "!" if layout == "sd2" else "<|endoftext|>", "bos_token": "<|startoftext|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(token_map))
    ours = load(route, folder, tmp_path)
    hf = hf_clip.from_pretrained(folder)
    assert ours.pad_id == hf.pad_token_id == (EOS if layout == "sd15" else 0)
    np.testing.assert_array_equal(ours.encode(PROMPTS).input_ids, _hf_ids(hf, PROMPTS))


@needs_clip
@ROUTES
@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_json_saved_by_transformers(tmp_path, clip, hf_clip, pad_token, route):
    hf = hf_clip.from_pretrained(CLIP_DIR, pad_token=pad_token)
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    for name in ("vocab.json", "merges.txt"):  # make sure tokenizer.json is what gets read
        (saved / name).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    ours = load(route, saved, tmp_path)
    assert ours.max_length == 77  # the saved config says 1e30 ("no limit"): the CLIP default applies
    np.testing.assert_array_equal(ours.encode(PROMPTS).input_ids, _hf_ids(hf, PROMPTS))
    if pad_token == "<|endoftext|>":
        np.testing.assert_array_equal(ours.encode(PROMPTS).input_ids, clip.encode(PROMPTS).input_ids)


@needs_clip
def test_dropped_words(clip):
    long_prompt = " ".join(LONG_WORDS)
    split_word = " ".join(["photorealistic"] * 60)  # photo + realistic: token 75 is the "photo" of word 38
    batch = clip.encode(["a photo of a cat", long_prompt, "", split_word])
    assert batch.dropped[0] == "" and batch.dropped[2] == ""
    assert batch.input_ids[1, 0] == BOS and batch.input_ids[1, -1] == EOS and EOS not in batch.input_ids[1, :-1]
    assert batch.dropped[1] == " ".join(LONG_WORDS[75:])
    assert batch.dropped[3] == " ".join(["photorealistic"] * (60 - 37))
    exact_fit = " ".join(LONG_WORDS[:75])
    assert clip.encode([exact_fit]).dropped == [""]
    assert clip.encode([exact_fit + " dog"]).dropped == ["dog"]


@needs_clip
def test_dropped_long_unspaced_run_starts_at_the_cut(clip):
    prompt = "a " + "東京" * 100  # one pre-tokenizer word, 3 byte-level tokens per character
    dropped = clip.encode([prompt]).dropped[0]
    assert dropped.startswith("…") and prompt.endswith(dropped[1:]) and len(dropped) < len(prompt) - 20


@needs_clip
def test_dropped_keeps_original_text(clip):
    prompt = " ".join(LONG_WORDS[:75]) + "  Café\tÜBER 🐱!"
    assert clip.encode([prompt]).dropped == ["Café\tÜBER 🐱!"]


@needs_clip
def test_unknown_words_empty_for_byte_level_bpe(clip):
    assert clip.unknown_words("a zxqv 🐱 東京 <|endoftext|>") == []


@pytest.mark.parametrize("route", ["tokenizer.json", "legacy"])
def test_word_level_tokenizer_json(tmp_path, route):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "red": 3, "cat": 4}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    if route == "legacy":  # v1: a bare tokenizer.json, its length and pad token in the config
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": 8, "pad_token": "[PAD]", "unk_token": "[UNK]"})
        )
    else:
        word_level.enable_truncation(8)
        word_level.enable_padding(length=8, pad_id=0, pad_token="[PAD]")
    word_level.save(str(tmp_path / "tokenizer.json"))
    tok = legacy(tmp_path) if route == "legacy" else ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.max_length, tok.pad_id, tok.bos_id, tok.eos_id) == (8, 0, None, None)
    assert tok.unknown_words("a red zebra, a RED cat zebra") == ["zebra", ",", "RED"]
    batch = tok.encode(["a red cat", "a a a a a a a a red cat"])
    assert batch.input_ids.tolist() == [[2, 3, 4, 0, 0, 0, 0, 0], [2] * 8]
    assert batch.dropped == ["", "red cat"]


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        ClipTokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as err:
        from_legacy_files(tmp_path, 77)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "tokenizer.json" in message and "vocab.json + merges.txt" in message
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError):
        from_legacy_files(tmp_path, 77)  # merges.txt missing
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_legacy_files(tmp_path / "nowhere", 77)


@needs_clip
def test_bad_input_is_one_clear_error(tmp_path, clip):
    with pytest.raises(TypeError, match="list"):
        clip.encode("a cat")
    assert clip.encode([]).input_ids.shape == (0, 77)
    folder = _copy_clip(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        legacy(folder)


@needs_clip
def test_speed(clip, tmp_path):
    clip._tok.save(str(tmp_path / "tokenizer.json"))
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        tok = ClipTokenizer.from_file(tmp_path / "tokenizer.json")
        loads.append(time.perf_counter() - start)
    prompts = ["a photo of an astronaut riding a horse on mars, highly detailed", "blurry, low quality"]
    tok.encode(prompts)
    encodes = []
    for _ in range(200):
        start = time.perf_counter()
        tok.encode(prompts)
        encodes.append(time.perf_counter() - start)
    assert min(loads) < 0.5, loads
    assert statistics.median(encodes) < 1e-3, statistics.median(encodes)


def test_runtime_module_imports_no_torch_or_transformers():
    code = ("import sys, edgediff.runtime.tokenizers, edgediff.runtime.legacy_tokenizer; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
