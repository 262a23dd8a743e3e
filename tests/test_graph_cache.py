"""The "all"-level graph cache: written once, then loaded in place of the exported graph; keyed, rebuilt, optional."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgediff import Pipeline
from edgediff.bundle import SessionOptions, read_manifest
from edgediff.runtime import graph_cache
from edgediff.runtime.backends.ort import session_options

ort = pytest.importorskip("onnxruntime")
CPU = ["CPUExecutionProvider"]
RENDER = dict(num_inference_steps=2, height=32, width=32, seed=3, output_type="np")


def _open(root, name="unet", level="all"):
    c = read_manifest(root).components[name]
    options = session_options(ort, SessionOptions(level), threads=None, lean=False)
    return graph_cache.open_session(ort, root / c.file, c.files, options, CPU, cache=True)


def _feeds(session):
    rng = np.random.default_rng(0)
    dims = {"batch": 2, "sequence": 77, "latent_height": 8, "latent_width": 8}
    return {i.name: rng.standard_normal([d if isinstance(d, int) else dims[d] for d in i.shape]).astype(np.float32)
            for i in session.get_inputs()}


def _cached(root, name="unet"):
    return list((root / name / graph_cache.CACHE_FOLDER).glob("*/model.onnx"))


def test_first_load_writes_the_optimised_graph_and_later_loads_use_it(bundle_copy):
    root = bundle_copy("sd1")
    first = _open(root)
    (cached,) = _cached(root)
    feeds = _feeds(first)
    expected = first.run(None, feeds)[0]
    (root / "unet" / "model.onnx").write_bytes(b"not a graph any more")  # only the cache can serve now
    again = _open(root)
    np.testing.assert_allclose(again.run(None, feeds)[0], expected, rtol=1e-5, atol=1e-5)
    assert _cached(root) == [cached]


def test_a_damaged_cache_is_rebuilt(bundle_copy):
    root = bundle_copy("sd1")
    _open(root)
    (cached,) = _cached(root)
    cached.write_bytes(b"damaged")
    session = _open(root)
    assert session.run(None, _feeds(session))[0].shape == (2, 4, 8, 8)
    (rebuilt,) = _cached(root)
    assert rebuilt.read_bytes() != b"damaged"


def test_no_cache_below_the_extended_level_or_when_switched_off(bundle_copy, monkeypatch):
    root = bundle_copy("sd1")
    _open(root, level="basic")
    assert not _cached(root)
    _open(root, level="extended")  # int8 QDQ graphs run at "extended": their cache has a key of its own
    assert ["ext" in graph.parent.name.split("-") for graph in _cached(root)] == [True]
    shutil.rmtree(root / "unet" / graph_cache.CACHE_FOLDER)
    monkeypatch.setenv(graph_cache.ENV_SWITCH, "off")
    _open(root)
    assert not _cached(root)


def test_a_bundle_it_cannot_write_to_caches_in_the_users_folder(bundle_copy, tmp_path, monkeypatch):
    root = bundle_copy("sd1")
    (root / "unet" / graph_cache.CACHE_FOLDER).write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _open(root)
    assert len(list((tmp_path / "xdg").glob("edgediff/ort-optimized/*/model.onnx"))) == 1


def test_the_key_follows_the_graph_and_the_onnxruntime_version(bundle):
    files = read_manifest(bundle("sd1")).components["unet"].files
    other = read_manifest(bundle("sd1")).components["vae_decoder"].files
    key = graph_cache.cache_key("1.32.0", files)
    assert key == graph_cache.cache_key("1.32.0", files)
    assert key != graph_cache.cache_key("1.33.0", files) and key != graph_cache.cache_key("1.32.0", other)


def test_export_warms_the_cache_of_large_convolutional_graphs(checkpoint, tmp_path, monkeypatch):
    """With every graph counted as large: convolutional graphs are cached at "all" by the export's own parity gate
    (the bundle arrives optimised for this machine), the text encoder at "extended", and renders match."""
    from edgediff.export import onnx as export_onnx
    from edgediff.export.convert import export_bundle

    monkeypatch.setattr(export_onnx, "LARGE_GRAPH_BYTES", 0)
    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", 0)  # and large enough to be cached
    out = tmp_path / "bundle"
    export_bundle(checkpoint("sd1"), out)
    components = read_manifest(out).components
    assert components["unet"].ort_options == SessionOptions("all", disable_prepacking=False,
                                                            cache_optimized_graph=True)
    assert components["text_encoder"].ort_options.graph_optimization_level == "extended"
    assert components["text_encoder"].ort_options.cache_optimized_graph
    assert len(_cached(out, "unet")) == 1 and len(_cached(out, "vae_decoder")) == 1
    assert ["ext" in g.parent.name.split("-") for g in _cached(out, "text_encoder")] == [True]
    from click.testing import CliRunner

    from edgediff.cli import main

    shown = CliRunner().invoke(main, ["info", str(out)]).stdout
    assert shown.count("optimised for 1 machine(s)") == 4 and "unet/.ort-optimized" in shown  # and the encoder
    cached = Pipeline.load(out)("a red cat", **RENDER).images
    monkeypatch.setenv(graph_cache.ENV_SWITCH, "off")
    np.testing.assert_allclose(Pipeline.load(out)("a red cat", **RENDER).images, cached, atol=1e-4)


def test_the_cache_keeps_the_pre_packed_weights_for_the_next_load(bundle_copy):
    """A session that pre-packs saves the packed copies with the graph (the next load maps them instead of packing);
    a session that packs nothing (a graph whose manifest says so) reads that cache as it is."""
    root = bundle_copy("sd1")
    c = read_manifest(root).components["unet"]

    def cache_made(packing):
        shutil.rmtree(root / "unet" / graph_cache.CACHE_FOLDER, ignore_errors=True)
        options = session_options(ort, SessionOptions("all", disable_prepacking=not packing), threads=None, lean=False)
        session = graph_cache.open_session(ort, root / c.file, c.files, options, CPU, cache=True)
        (cached,) = _cached(root)
        return session, cached.with_name("model.onnx.data").stat().st_size

    packing, with_packs = cache_made(packing=True)
    _, without_packs = cache_made(packing=False)
    assert with_packs > without_packs * 1.1
    expected = packing.run(None, feeds := _feeds(packing))[0]
    cache_made(packing=True)
    unpacked = SessionOptions("all", disable_prepacking=True)
    reader = graph_cache.open_session(ort, root / c.file, c.files,
                                      session_options(ort, unpacked, threads=None, lean=False), CPU, cache=True)
    np.testing.assert_allclose(reader.run(None, feeds)[0], expected, rtol=1e-5, atol=1e-5)


def test_low_memory_sessions_drop_the_planned_block_and_reuse_and_keep_the_arena_and_packing():
    """memory="low" (lean) sessions: no pre-planned activation block (it holds a call's activations all at once)
    and no reuse plan (it stretches buffers' lives: T5-XXL's stage 1.5 GB higher); the arena and pre-packing stay,
    as both lower the peak (without them the int8 VAE decoder's stage peaked at 1.6-1.9 GB against 1.2 GB, and ran
    2-4x slower: docs/loading.md)."""
    lean = session_options(ort, SessionOptions("all"), threads=None, lean=True)
    assert not lean.enable_mem_pattern and not lean.enable_mem_reuse and lean.enable_cpu_mem_arena
    assert graph_cache._prepacking(lean)
    normal = session_options(ort, SessionOptions("all"), threads=None, lean=False)
    assert normal.enable_mem_pattern and normal.enable_mem_reuse and normal.enable_cpu_mem_arena


def test_graphs_with_a_data_file_of_their_own_are_cached():
    """From the size that gets an external data file, the export marks a graph for the cache (which keeps its
    pre-packed weights): the fp32 VAE decoder as well as the U-Net; small graphs load fast without."""
    from edgediff.export.onnx import EXTERNAL_DATA_THRESHOLD, LARGE_GRAPH_BYTES, default_ort_options

    assert not default_ort_options(EXTERNAL_DATA_THRESHOLD).cache_optimized_graph
    assert default_ort_options(EXTERNAL_DATA_THRESHOLD + 1, convolutional=True) == SessionOptions(
        "all", disable_prepacking=False, cache_optimized_graph=True)
    encoder = default_ort_options(LARGE_GRAPH_BYTES + 1)
    assert (encoder.graph_optimization_level, encoder.cache_optimized_graph) == ("extended", True)
