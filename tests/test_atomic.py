"""Atomic writes: a failed write leaves the old file or folder as it was and nothing half-written beside it."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from edgediff.atomic import atomic_file, atomic_files, atomic_folder
from edgediff.runtime.images import save_png


def _only(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_replaced_only_when_the_write_succeeds(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old" and _only(tmp_path) == ["a.txt"]
    with atomic_file(target) as tmp:
        assert tmp.suffix == ".txt" and tmp.parent == tmp_path  # writers that read the suffix see the real one
        tmp.write_text("new")
    assert target.read_text() == "new" and _only(tmp_path) == ["a.txt"]


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def failing_replace(src, dst):
        raise OSError("injected")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"), atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "old" and _only(tmp_path) == ["a.txt"]


def test_several_files_are_written_all_or_none(tmp_path):
    targets = [tmp_path / "x-1.png", tmp_path / "x-2.png"]
    with pytest.raises(OSError), atomic_files(targets) as temps:
        temps[0].write_bytes(b"one")
        raise OSError("the second write failed")
    assert _only(tmp_path) == []
    with atomic_files(targets) as temps:
        for t, data in zip(temps, (b"one", b"two")):
            t.write_bytes(data)
    assert [t.read_bytes() for t in targets] == [b"one", b"two"] and _only(tmp_path) == ["x-1.png", "x-2.png"]


def test_a_failed_png_write_keeps_the_old_png(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, "first")

    def failing_save(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_png(Image.new("RGB", (8, 8), "blue"), path, "second")
    with Image.open(path) as im:
        assert im.text["parameters"] == "first" and im.getpixel((0, 0)) == (255, 0, 0)
    assert _only(tmp_path) == ["out.png"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "bundle"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("parity failed")
    assert _only(tmp_path) == []
    with atomic_folder(target) as tmp:
        (tmp / "model.onnx").write_text("v1")
    assert (target / "model.onnx").read_text() == "v1"


def test_an_existing_folder_is_kept_unless_replacing_succeeds(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "model.onnx").write_text("old")
    with pytest.raises(FileExistsError), atomic_folder(target) as tmp:
        (tmp / "model.onnx").write_text("new")
    with pytest.raises(KeyboardInterrupt), atomic_folder(target, replace=True) as tmp:
        (tmp / "model.onnx").write_text("new")
        raise KeyboardInterrupt
    assert (target / "model.onnx").read_text() == "old" and _only(tmp_path) == ["bundle"]
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert (target / "model.onnx").read_text() == "new" and _only(tmp_path) == ["bundle"]
