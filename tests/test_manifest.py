"""The manifest as a typed contract: v1 bundles load through the migration, malformed fields are one clear line,
exports write canonical tokenizers, axis ranges, the default schedule and the source's licence."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgediff.bundle import (
    FORMAT_VERSION,
    AxisRange,
    BundleError,
    FileEntry,
    Manifest,
    SessionOptions,
    default_axis_ranges,
    load_manifest,
    read_manifest,
    write_manifest,
)
from edgediff.cli import main
from edgediff.models import BUILTIN_BUNDLE
from edgediff.runtime.prompts import PromptEncoder
from edgediff.runtime.sampler_catalogue import PRESETS

DATA = Path(__file__).parent / "data"
needs_builtin = pytest.mark.skipif(not (BUILTIN_BUNDLE / "manifest.json").is_file(), reason="no built-in bundle")
AWKWARD = ["a photo of a cat", "", "wow!! amazing! really!!!", "hello<|endoftext|>world", "a <|ENDOFTEXT|> x",
           "Café, naïve façade 東京の夜景 🐱🐶", "(masterpiece:1.2), [[best]]", " ".join(["photorealistic"] * 60)]


def _v1_builtin(tmp_path: Path) -> Path:
    """The built-in bundle as edgediff 0.1 shipped it: its graphs and tokenizer.json, the v1 manifest and config."""
    root = tmp_path / "v1_builtin"
    shutil.copytree(BUILTIN_BUNDLE, root)
    shutil.copytree(DATA / "v1_builtin", root, dirs_exist_ok=True)
    return root


@needs_builtin
def test_v1_builtin_loads_migrated_and_renders_as_v2(tmp_path):
    from edgediff import Pipeline

    root = _v1_builtin(tmp_path)
    m = load_manifest(root, verify=True)
    assert m.migrated_from == 1 and list(m.tokenizers) == ["tokenizer"]
    assert m.tokenizers["tokenizer"].max_length == 20  # from its tokenizer_config.json, as 0.1 read it
    assert m.defaults.schedule == "lcm" and m.provenance.licence == "unknown"
    assert m.components["unet"].axes["latent_height"] == AxisRange(4, 8, 16)
    assert m.components["unet"].axes["batch"] == AxisRange(1, 1, 8)
    assert m.components["unet"].ort_options == SessionOptions("all", False, False)
    assert "kind" not in json.dumps(m.to_json()) and (root / "manifest.json").read_text().count('"kind"') == 1
    kw = {"seed": 3, "output_type": "np"}
    old = Pipeline.load(root)("a red circle left of a blue square", **kw).images
    new = Pipeline.load(BUILTIN_BUNDLE)("a red circle left of a blue square", **kw).images
    np.testing.assert_array_equal(old, new)


@needs_builtin
def test_migrated_manifest_written_back_is_v2_and_reads_the_same(tmp_path):
    root = _v1_builtin(tmp_path)
    migrated = read_manifest(root)
    write_manifest(root, migrated)
    again = read_manifest(root)
    assert json.loads((root / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 2
    assert again == dataclasses.replace(migrated, migrated_from=None)


def test_v1_sdxl_tokenizers_by_role_and_converted_in_memory():
    transformers = pytest.importorskip("transformers")
    root = DATA / "v1_sdxl"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    m = read_manifest(root)
    assert m.migrated_from == 1 and set(m.tokenizers) == {"tokenizer", "tokenizer_2"}
    assert [e.tokenizer for e in m.text_encoders] == ["tokenizer", "tokenizer_2"]
    assert m.defaults.schedule == "discrete" and m.components["unet"].axes["sequence"] == AxisRange(77, 77, 77)
    encoder = PromptEncoder(root, m)
    for key in ("tokenizer", "tokenizer_2"):
        hf = transformers.CLIPTokenizer.from_pretrained(root / key)
        theirs = hf(AWKWARD, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert encoder.tokenizers[key].encode(AWKWARD).input_ids.tolist() == theirs, key
    assert encoder.tokenizers["tokenizer_2"].pad_id == 0  # pads with "!"
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}  # nothing written


def test_v1_preset_table_is_todays():
    from edgediff.migrate import V1_PRESET_SCHEDULES

    # frozen as 0.1 read it; if the runtime's table changes, v1 bundles keep their old meaning
    assert V1_PRESET_SCHEDULES == {name: p.schedule for name, p in PRESETS.items()}


def _v2(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "v2"
    shutil.copytree(BUILTIN_BUNDLE, root)
    return root, json.loads((root / "manifest.json").read_text())


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@needs_builtin
@pytest.mark.parametrize("field,value,message", [
    ("defaults.steps", "four", "defaults.steps: expected an integer, found 'four'"),
    ("defaults.steps", 0, "defaults.steps: 0 is below 1"),
    ("defaults.height", "512", "defaults.height: expected an integer"),
    ("defaults.guidance_scale", "7.5", "defaults.guidance_scale: expected a number"),
    ("defaults.schedule", KeyError, "defaults.schedule: missing"),
    ("components", [], "components: expected an object"),
    ("components", {}, "components: empty"),
    ("size_multiple", 0, "size_multiple: 0 is below 1"),
    ("prediction_type", "x0", "prediction_type: 'x0' is not one of epsilon, v_prediction, sample"),
    ("components.unet.ort_options.graph_optimization_level", "max", "graph_optimization_level: 'max' is not one"),
    ("components.unet.ort_options.disable_prepacking", "no", "disable_prepacking: expected true or false"),
    ("components.unet.axes.latent_height", {"min": 8, "opt": 4, "max": 16}, "latent_height: min 8, opt 4"),
    ("components.unet.axes", {}, "components.unet.axes: no range for dynamic axis 'batch'"),
    ("components.unet.parity.max_abs_err", None, "parity.max_abs_err: expected a number"),
    ("tokenizers.tokenizer.max_length", "77", "tokenizers.tokenizer.max_length: expected an integer"),
    ("tokenizers", {}, "tokenizers: empty"),
    ("text_encoders", [{"component": "text_encoder", "tokenizer": "nope"}], "text_encoders[0].tokenizer"),
    ("provenance.loras", "none", "provenance.loras: expected a list"),
    ("format_version", 3, "format version 3"),
])
def test_malformed_field_is_one_line_naming_it(tmp_path, field, value, message):
    root, d = _v2(tmp_path)
    _set(d, field, value)
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError) as err:
        load_manifest(root)
    assert message in str(err.value) and "\n" not in str(err.value) and "re-export" in str(err.value)
    r = CliRunner().invoke(main, ["info", str(root)])
    assert r.exit_code == 2 and "Traceback" not in r.output and message in r.output


@needs_builtin
@pytest.mark.parametrize("content", ["{not json", json.dumps({"model": {"type": "WordLevel"}}), "{}"])
def test_garbage_tokenizer_json_is_one_line(tmp_path, content):
    from edgediff import Pipeline

    root, d = _v2(tmp_path)
    (root / "tokenizer" / "tokenizer.json").write_text(content)
    d["tokenizers"]["tokenizer"]["files"] = [dataclasses.asdict(FileEntry.of(root, "tokenizer/tokenizer.json"))]
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError) as err:
        Pipeline.load(root)
    assert "tokenizer.json" in str(err.value) and "\n" not in str(err.value)


@needs_builtin
def test_tokenizer_without_padding_is_refused(tmp_path):
    from tokenizers import Tokenizer

    from edgediff import Pipeline

    root, d = _v2(tmp_path)
    tok = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    tok.no_padding()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    d["tokenizers"]["tokenizer"]["files"] = [dataclasses.asdict(FileEntry.of(root, "tokenizer/tokenizer.json"))]
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(BundleError, match="not a canonical tokenizer"):
        Pipeline.load(root)


def test_default_axis_ranges():
    ranges = default_axis_ranges(["batch", "sequence", "latent_height", "width"], height=512, width=768,
                                 downscale=8, size_multiple=64, sequence=77, max_batch=4)
    assert ranges == {"batch": AxisRange(1, 1, 4), "sequence": AxisRange(77, 77, 77),
                      "latent_height": AxisRange(32, 64, 128), "width": AxisRange(384, 768, 1536)}
    sized = default_axis_ranges(["height"], height=512, width=512, downscale=8, size_multiple=64, sequence=77,
                                size_range=(300, 1000))
    assert sized["height"] == AxisRange(256, 512, 1024)  # rounded out to the size multiple
    with pytest.raises(ValueError, match="frames"):
        default_axis_ranges(["frames"], height=8, width=8, downscale=8, size_multiple=8, sequence=77)


def test_model_card_licence(tmp_path):
    from edgediff.export.checkpoint import Checkpoint

    ck = Checkpoint(tmp_path, {}, {}, {}, {}, {})
    assert ck.licence() is None
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: openrail++\ntags: [x]\n---\n# license: mit\n")
    assert ck.licence() == "openrail++"
    (tmp_path / "README.md").write_text("# A model\nlicense: mit\n")
    assert ck.licence() is None  # only the front matter counts


def test_export_writes_the_v2_contract(checkpoint, tmp_path):
    pytest.importorskip("torch")
    src = tmp_path / "src"
    shutil.copytree(checkpoint("sd1"), src)
    (src / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n")
    out = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["export", str(src), str(out), "--preset", "lightning"])
    assert r.exit_code == 0, r.output
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == 2 and "tokenizer" not in raw and "tokenizer_2" not in raw
    assert raw["tokenizers"]["tokenizer"]["files"][0]["path"] == "tokenizer/tokenizer.json"
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["tokenizer.json"]
    assert "kind" not in raw["tokenizers"]["tokenizer"]
    assert raw["defaults"]["schedule"] == "trailing" and raw["components"]["unet"]["axes"]["batch"]["max"] == 8
    m = Manifest.from_json(raw)
    assert m.provenance.licence == "creativeml-openrail-m" and m.provenance.licence_from == "the model card"
    r = CliRunner().invoke(main, ["info", str(out)])
    assert "licence: creativeml-openrail-m (from the model card)" in r.output
    r = CliRunner().invoke(main, ["export", str(src), str(out), "--force", "--license", "mit"])
    assert r.exit_code == 0, r.output
    assert "licence: mit (from --license)" in CliRunner().invoke(main, ["info", str(out)]).output
