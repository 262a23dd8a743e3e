"""Paths that must be refused in one line: a manifest that reaches outside its bundle (absolute, `..`, symbolic
links out), corruption only a full hash sees, and PNG outputs a write would fail on (checked before the render).

Devices are never the real /dev/full or /dev/null: a regression would replace the machine's node with a PNG (root
may rename over it), so the cases make a pipe, or a clone of /dev/full, inside tmp_path.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from edgediff.bundle import BundleError, Component, FileEntry, TensorSpec, load_manifest
from edgediff.runtime.pipeline import Pipeline

from .conftest import refused, tmpfs


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def unet(raw):
    return raw["components"]["unet"]


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: unet(m).update(file="/etc/passwd"), "components.unet.file: '/etc/passwd' is absolute"),
    (lambda m: unet(m)["files"][0].update(path="/etc/passwd"), "'/etc/passwd' is absolute"),
    (lambda m: unet(m).update(file="../outside/model.onnx"), "climbs out of the bundle"),
    (lambda m: unet(m)["files"][0].update(path="unet/../../x.onnx"), "climbs out of the bundle"),
    (lambda m: unet(m).update(file="C:/models/unet.onnx"), "is absolute"),
    (lambda m: unet(m).update(file="unet\\..\\..\\x.onnx"), "climbs out of the bundle"),
    (lambda m: unet(m).update(file=""), "is not a path inside the bundle"),
    (lambda m: m["tokenizers"]["tokenizer"].update(path="../tokenizer"), "climbs out of the bundle"),
    (lambda m: m["tokenizers"]["tokenizer"]["files"][0].update(path="/etc/hostname"), "is absolute"),
    (lambda m: unet(m).update(file="vae_decoder/model.onnx"), "is not among the component's files"),
    (lambda m: unet(m)["files"][0].update(size=-1), "files[0].size: -1 is below 0"),
])
def test_a_manifest_path_out_of_the_bundle_is_refused(builtin_copy, change, message):
    edit_manifest(builtin_copy, change)
    refused(["info", builtin_copy], message, watch=[builtin_copy])
    with pytest.raises(BundleError, match="re-export"):
        Pipeline.load(builtin_copy)


def test_an_absolute_path_to_a_graph_elsewhere_does_not_render(builtin_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes((builtin_copy / "unet/model.onnx").read_bytes())
    edit_manifest(builtin_copy, lambda m: (unet(m).update(file=str(elsewhere)),
                                           unet(m)["files"][0].update(path=str(elsewhere))))
    refused(["render", "x", "-m", builtin_copy, "-o", tmp_path / "o.png"], "is absolute", watch=[tmp_path])


def test_a_file_linked_out_of_the_bundle_is_refused_unless_allowed(builtin_copy, tmp_path):
    blob = tmp_path / "blobs" / "c9e1f22c"
    blob.parent.mkdir()
    (builtin_copy / "unet/model.onnx").rename(blob)
    (builtin_copy / "unet/model.onnx").symlink_to(blob)  # as a hub cache lays a snapshot out
    refused(["info", builtin_copy], "cp -rL SRC DST", watch=[tmp_path])
    refused(["render", "x", "-m", builtin_copy, "-o", tmp_path / "o.png"], "--allow-symlinks", watch=[tmp_path])
    with pytest.raises(BundleError, match="outside the bundle"):
        Pipeline.load(builtin_copy)
    assert Pipeline.load(builtin_copy, allow_symlinks=True).manifest.components["unet"]
    from click.testing import CliRunner

    from edgediff.cli import main

    assert CliRunner().invoke(main, ["info", str(builtin_copy), "--allow-symlinks"]).exit_code == 0


def test_a_tokenizer_folder_linked_out_is_refused(builtin_copy, tmp_path):
    outside = tmp_path / "tokenizer-elsewhere"
    (builtin_copy / "tokenizer").rename(outside)
    (builtin_copy / "tokenizer").symlink_to(outside, target_is_directory=True)
    refused(["info", builtin_copy], "outside the bundle", watch=[tmp_path])


def test_a_link_inside_the_bundle_is_fine(builtin_copy):
    (builtin_copy / "unet/model.onnx").rename(builtin_copy / "unet/real.onnx")
    (builtin_copy / "unet/model.onnx").symlink_to("real.onnx")
    assert load_manifest(builtin_copy).family == "sd1"


def test_corruption_between_the_fingerprint_samples_needs_the_full_hash(builtin_copy, tmp_path):
    graph = builtin_copy / "unet/model.onnx"
    data = bytearray(graph.read_bytes())
    spacing = (len(data) - 4096) // 15  # the fingerprint reads 4 KiB at i * spacing, i = 0..15
    data[spacing // 2] ^= 0xFF  # halfway between the first two samples
    graph.write_bytes(bytes(data))
    load_manifest(builtin_copy)  # the fast check cannot see it
    with pytest.raises(BundleError, match="sha256 differs"):
        load_manifest(builtin_copy, verify="full")
    with pytest.raises(BundleError, match="sha256 differs"):
        Pipeline.load(builtin_copy, verify=True)
    with pytest.raises(ValueError, match="'fast' or 'full'"):
        load_manifest(builtin_copy, verify="sometimes")  # type: ignore[arg-type]
    refused(["render", "x", "-m", builtin_copy, "--verify", "-o", tmp_path / "o.png"], "sha256 differs",
            watch=[tmp_path])


@pytest.mark.parametrize("location", ["../outside.bin", "/tmp/edgediff-outside.bin"])
def test_external_data_outside_the_graph_folder_fails_to_load(tmp_path, location):
    """onnxruntime confines external data to the graph's folder; edgediff says so in one BundleError line."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edgediff.runtime.backends import open_session
    from edgediff.runtime.sessions import SessionSettings

    secret = Path(location) if location.startswith("/") else tmp_path / "outside.bin"
    secret.write_bytes(np.ones(4, np.float32).tobytes())
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    root = tmp_path / "bundle"
    (root / "unet").mkdir(parents=True)
    (root / "unet/model.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                            .SerializeToString())
    assert onnx
    component = Component(file="unet/model.onnx", precision="fp32", inputs=(TensorSpec("x", "float32", (4,)),),
                          outputs=(TensorSpec("y", "float32", (4,)),),
                          files=(FileEntry.of(root, "unet/model.onnx"),))
    try:
        with pytest.raises(BundleError, match="ONNX Runtime cannot load it") as e:
            open_session(root, "unet", component, "cpu", SessionSettings())
        assert "\n" not in str(e.value)
    finally:
        secret.unlink()


# --- PNG outputs, checked before the bundle is even loaded ---------------------------------------------------------

def render_to(output, *more):
    return ["render", "x", "-m", "/nonexistent-bundle", "-o", output, *more]  # the bundle is never reached


def test_an_output_that_is_a_folder(tmp_path):
    refused(render_to(tmp_path), "is a folder", watch=[tmp_path])


def test_an_empty_output(tmp_path):
    refused(render_to(""), "is not a file name", watch=[tmp_path])


def test_an_output_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    refused(render_to(tmp_path / "notes.txt" / "deeper" / "o.png"), "is a file, not a folder", watch=[tmp_path])


def test_an_output_name_too_long(tmp_path):
    refused(render_to(tmp_path / ("x" * 250 + ".png")), "File name too long", watch=[tmp_path])


def test_an_output_that_is_a_pipe(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    refused(render_to(tmp_path / "pipe"), "not a regular file", watch=[tmp_path])


def test_an_output_that_is_a_device(tmp_path):
    full = tmp_path / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a clone of /dev/full
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e}); the pipe case covers non-regular files")
    refused(render_to(full), "not a regular file", watch=[tmp_path / "other"])
    assert stat.S_ISCHR(full.stat().st_mode)


def test_one_bad_name_of_several_images_is_refused_first(tmp_path):
    (tmp_path / "cat-2.png").mkdir()
    refused(render_to(tmp_path / "cat.png", "--num-images", "3"), "cat-2.png: is a folder", watch=[tmp_path])


def test_a_read_only_folder(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        refused(render_to(folder / "o.png"), "Read-only file system", watch=[folder])


@pytest.mark.parametrize(("args", "message"), [
    (["--num-images", "0"], "--num-images must be 1 to 64"),
    (["--num-images", "100000000"], "--num-images must be 1 to 64"),
    (["--seed", str(2**64)], "seed must be at most"),
    (["--steps", "1001", "--sampler", "euler"], "steps must be at most 1000"),
])
def test_numbers_past_what_a_render_takes(tmp_path, args, message):
    refused(["render", "x", "-o", tmp_path / "o.png", *args], message, watch=[tmp_path])
