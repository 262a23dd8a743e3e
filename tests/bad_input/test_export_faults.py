"""`edgediff export` faults: each is refused in one line, exit 2, before any model is loaded, and nothing is lost.

The --force cases matter most: OUT is replaced only when it is an edgediff bundle (or an empty folder), and never
when it is, holds or lies inside SRC. Every case exports a copy of the tiny SD1 checkpoint, so that a regression
destroys a copy, not the session's shared checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from bad_input.conftest import refused  # noqa: E402
from edgediff.atomic import exclusive  # noqa: E402


@pytest.fixture
def ck(checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(checkpoint("sd1"), tmp_path / "ck"))


def _bundle_like(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "edgediff-bundle", "format_version": 2}))
    return folder


# --- OUT and --force -------------------------------------------------------------------------------------------

def test_out_is_src(ck):
    refused(["export", ck, ck, "--force"], "OUT is the source itself", watch=[ck])


def test_out_is_a_symlink_to_src(ck, tmp_path):
    (tmp_path / "link").symlink_to(ck)
    refused(["export", ck, tmp_path / "link", "--force"], "OUT is the source itself", watch=[ck])


def test_out_inside_src(ck):
    refused(["export", ck, ck / "bundle", "--force"], "OUT lies inside the source", watch=[ck])


def test_out_deep_inside_src_creates_no_folder(ck):
    refused(["export", ck, ck / "a" / "b", "--force"], "OUT lies inside the source", watch=[ck])
    assert not (ck / "a").exists()


def test_src_inside_out(checkpoint, tmp_path):
    outer = tmp_path / "outer"
    src = Path(shutil.copytree(checkpoint("sd1"), outer / "ck"))
    refused(["export", src, outer, "--force"], "OUT holds the source", watch=[outer])


def test_out_a_folder_of_unrelated_files(ck, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    refused(["export", ck, out, "--force"], "not an edgediff bundle", watch=[ck, out])


def test_out_a_folder_whose_manifest_is_not_a_bundles(ck, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-elses"}))
    refused(["export", ck, out, "--force"], "not an edgediff bundle", watch=[ck, out])


def test_out_a_file(ck, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    refused(["export", ck, out, "--force"], "OUT is a file", watch=[ck, tmp_path])


def test_out_an_existing_bundle_without_force(ck, tmp_path):
    out = _bundle_like(tmp_path / "bundle")
    refused(["export", ck, out], "already exists; pass --force", watch=[ck, out])


# --- LoRA files ------------------------------------------------------------------------------------------------

def _lora(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


KOHYA_TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"
LORA_FILES = {
    "garbage": lambda p: p.write_bytes(b"this is not a safetensors file at all" * 10),
    "empty": lambda p: p.write_bytes(b""),
    "header-only-length": lambda p: p.write_bytes((2**40).to_bytes(8, "little")),
    "truncated": lambda p: p.write_bytes(
        _lora(p, {f"{KOHYA_TE}.lora_down.weight": (4, 32), f"{KOHYA_TE}.lora_up.weight": (37, 4)}).read_bytes()[:-64]),
}


@pytest.mark.parametrize("kind", LORA_FILES)
def test_damaged_lora(ck, tmp_path, kind):
    lora = tmp_path / "style.safetensors"
    LORA_FILES[kind](lora)
    refused(["export", ck, tmp_path / "out", "--lora", lora], "style.safetensors: not a .safetensors file"
            if kind in ("garbage", "empty", "header-only-length") else "cut short", watch=[ck, tmp_path])


def test_garbage_pickled_lora(ck, tmp_path):
    lora = tmp_path / "style.pt"
    lora.write_bytes(b"not a pickle, nor a zip archive")
    refused(["export", ck, tmp_path / "out", "--lora", lora, "--allow-pickle"], "not a readable LoRA file",
            watch=[ck, tmp_path])


def test_lora_without_lora_layers(ck, tmp_path):
    lora = _lora(tmp_path / "model.safetensors", {"conv_in.weight": (4, 4)})
    refused(["export", ck, tmp_path / "out", "--lora", lora], "no LoRA layers", watch=[ck, tmp_path])


def test_lora_for_another_architecture(ck, tmp_path):
    te2 = "lora_te2_text_model_encoder_layers_0_mlp_fc1"  # SDXL's second text encoder
    lora = _lora(tmp_path / "xl.safetensors", {f"{te2}.lora_down.weight": (4, 32), f"{te2}.lora_up.weight": (37, 4)})
    refused(["export", ck, tmp_path / "out", "--lora", lora], "another architecture", watch=[ck, tmp_path])


def test_missing_lora(ck, tmp_path):
    refused(["export", ck, tmp_path / "out", "--lora", tmp_path / "nope.safetensors"], "no such LoRA file",
            watch=[ck, tmp_path])


# --- the checkpoint --------------------------------------------------------------------------------------------

def _damage_index_json(ck: Path) -> None:
    (ck / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')


def _index_a_list(ck: Path) -> None:
    (ck / "model_index.json").write_text('["StableDiffusionPipeline"]')


def _no_unet(ck: Path) -> None:
    shutil.rmtree(ck / "unet")


def _damage_unet_config(ck: Path) -> None:
    (ck / "unet" / "config.json").write_text("{not json")


def _cut_short(component: str):
    def damage(ck: Path) -> None:
        weights = next((ck / component).glob("*.safetensors"))
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return damage


def _garbage_vae_weights(ck: Path) -> None:
    next((ck / "vae").glob("*.safetensors")).write_bytes(b"\x00" * 100)


CHECKPOINT_DAMAGE = {
    "index-invalid-json": (_damage_index_json, "model_index.json: not valid JSON"),
    "index-a-list": (_index_a_list, "a JSON list, where a JSON object is expected"),
    "no-unet-folder": (_no_unet, "unet/config.json is missing"),
    "unet-config-invalid-json": (_damage_unet_config, "unet/config.json: not valid JSON"),
    "unet-weights-cut-short": (_cut_short("unet"), "cut short"),
    "text-encoder-weights-cut-short": (_cut_short("text_encoder"), "cut short"),
    "vae-weights-garbage": (_garbage_vae_weights, "not a .safetensors file"),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_damaged_checkpoint(ck, tmp_path, case):
    damage, message = CHECKPOINT_DAMAGE[case]
    damage(ck)
    refused(["export", ck, tmp_path / "out"], message, watch=[ck, tmp_path])


# --- where OUT goes --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _read_only_folder(folder: Path, monkeypatch):
    """`folder`, made unwritable. Tests run as root, which ignores permission bits: an immutable folder (chattr +i)
    refuses root too. Where chattr cannot (no tool, a file system without attributes) the lock file's creation is
    made to fail with the PermissionError a read-only folder gives instead."""
    folder.mkdir()
    immutable = bool(shutil.which("chattr")) and \
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if not immutable:
        from edgediff import atomic

        def refuse(lock):
            raise PermissionError(13, "Permission denied", str(lock))

        monkeypatch.setattr(atomic, "_acquire", refuse)
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("depth", ["out-in-it", "out-below-it"])
def test_read_only_parent(ck, tmp_path, monkeypatch, depth):
    with _read_only_folder(tmp_path / "ro", monkeypatch) as ro:
        out = ro / "bundle" if depth == "out-in-it" else ro / "new" / "bundle"
        refused(["export", ck, out], "choose an OUT in a folder you can write", watch=[ck, tmp_path])


def test_a_concurrent_export_holds_the_lock(ck, tmp_path):
    out = _bundle_like(tmp_path / "bundle")
    with exclusive(out):  # what a running export holds: flock conflicts between two opens even in one process
        partial = tmp_path / ".bundle.partial-4242-abcdef"  # the running export's work: not stale, so kept
        partial.mkdir()
        refused(["export", ck, out, "--force"], f"another export to {out} is running", watch=[ck, out])
        assert partial.is_dir()
    assert not (tmp_path / ".bundle.lock").exists()


# --- arguments checked before any model is loaded --------------------------------------------------------------

@pytest.mark.parametrize("opset", [9, 16, 99])
def test_bad_opset(ck, tmp_path, opset):
    refused(["export", ck, tmp_path / "out", "--opset", opset], f"--opset {opset}: choose 17 to", watch=[ck, tmp_path])


def _tiny_vae_folder(tmp_path: Path, config: dict | None, weights: bytes | None = None) -> Path:
    folder = tmp_path / "taesd"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return folder


TINY_VAES = {
    "missing": (None, "no such folder"),
    "no-config": ({}, "no config.json"),
    "an-AutoencoderKL": ({"_class_name": "AutoencoderKL"}, "not an AutoencoderTiny"),
    "weights-garbage": ({"_class_name": "AutoencoderTiny"}, "not a .safetensors file"),
}


@pytest.mark.parametrize("case", TINY_VAES)
def test_bad_tiny_vae(ck, tmp_path, case, monkeypatch):
    config, message = TINY_VAES[case]
    if config is None:
        folder = tmp_path / "taesd"
    else:
        folder = _tiny_vae_folder(tmp_path, config or None, b"junk" if case == "weights-garbage" else None)
    # refused before the checkpoint is even opened, let alone a model loaded
    monkeypatch.setattr("edgediff.export.convert.Checkpoint.open", _never)
    refused(["export", ck, tmp_path / "out", "--tiny-vae", folder], message, watch=[ck, tmp_path])


def _never(*args, **kwargs):
    raise AssertionError("the checkpoint was opened before the arguments were checked")
