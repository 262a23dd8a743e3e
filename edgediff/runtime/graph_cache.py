"""ONNX Runtime's "all"-level graph, optimised once per machine and kept for later loads.

The "all" level re-lays every convolution out in NCHWc blocks sized for this CPU's vectors: faster steps for a
large convolutional graph, but seconds of graph work at every load. ONNX Runtime can save the graph it optimised;
a later session loads that file with optimisations off, quickly, and runs it just as fast (docs/loading.md has the
figures). The saved layout is valid only for the
CPU features and onnxruntime version that made it, so a cached graph is keyed by both, and by the fingerprints of
the graph it was made from (a re-exported bundle never meets a stale cache).

Before ONNX Runtime optimises it, a CPU session's graph gets fused attention (backends/ort_attention.py), so the
cached graph holds that too and the key says which rewrite made it. Where the session that makes the cache
pre-packs its weights, the cache keeps the packed copies too (keys end in `-pp1`), so a later load maps them
instead of re-packing: most of a large graph's load time (docs/loading.md). A session without pre-packing
(its manifest says so) reads the same cache and ignores them; one that made the cache leaves them out, and sessions that
pre-pack then pack at load, as without a cache.

Where: `<component>/.ort-optimized/<key>/` inside the bundle, so that the export can warm it and a copied bundle
carries it; where the bundle is read-only (an installed package), the user's cache folder. Set
EDGEDIFF_GRAPH_CACHE=off to load every time from the exported graph. Only CPU sessions use it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from ..atomic import atomic_folder
from ..bundle import FileEntry
from .backends import ort_attention

CACHE_FOLDER = ".ort-optimized"
ENV_SWITCH = "EDGEDIFF_GRAPH_CACHE"
FUSION_SWITCH = "EDGEDIFF_FUSED_ATTENTION"  # "off": CPU sessions run the exported attention as it is
DISABLE_PREPACKING = "session.disable_prepacking"
PREPACK_VERSION = "pp1"  # caches that may hold the kernels' pre-packed weights beside the graph's own


def enabled(switch: str = ENV_SWITCH) -> bool:
    return os.environ.get(switch, "on").strip().lower() not in {"0", "off", "no", "false"}


def fused_graph(source: Path) -> bytes | None:
    """`source` with its attention fused for ONNX Runtime's CPU kernels, serialised; None where there is none to
    fuse, fusion is switched off, or the onnx package is missing."""
    if not enabled(FUSION_SWITCH):
        return None
    try:
        import onnx
    except ImportError:
        return None
    from .backends.ort_attention import fuse_attention

    model = onnx.load(os.fspath(source), load_external_data=False)
    return model.SerializeToString() if fuse_attention(model) else None


def _session(ort: Any, source: Path, graph: bytes | None, options: Any, providers: list[Any]) -> Any:
    """A session on `graph` (source's rewritten form, whose external weights stay beside source) or on source."""
    if graph is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         os.fspath(source.parent))
        try:
            return ort.InferenceSession(graph, options, providers=providers)
        except Exception:  # an onnxruntime that cannot read a graph from memory beside its weights: run it unfused
            pass
    return ort.InferenceSession(os.fspath(source), options, providers=providers)


def cpu_features() -> list[str]:
    """The vector extensions this process can use, as NumPy's runtime dispatch detected them ([] if unknown)."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # NumPy 2, NumPy 1.x
        try:
            features: dict[str, bool] = importlib.import_module(module).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return sorted(name for name, present in features.items() if present)
    return []


def cache_key(ort_version: str, files: tuple[FileEntry, ...], rewrite: str = "") -> str | None:
    """The folder name for a graph made of `files` (and rewritten by `rewrite`) on this machine; None where the
    CPU cannot be identified."""
    features = cpu_features()
    if not features:
        return None
    machine = hashlib.sha256(" ".join([platform.machine(), *features]).encode()).hexdigest()[:10]
    graph = hashlib.sha256(" ".join(f.fingerprint for f in files).encode()).hexdigest()[:10]
    return f"ort{ort_version}-{platform.machine()}-{machine}-{graph}{'-' + rewrite if rewrite else ''}"


def user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgediff" / "ort-optimized"


def candidate_folders(source: Path, key: str) -> list[Path]:
    """Where a cached graph may live, in order of preference: beside the source graph, then the user's cache."""
    return [source.parent / CACHE_FOLDER / key, user_cache_root() / key]


# onnxruntime has no type stubs: its module, SessionOptions and InferenceSession are Any here
def open_session(ort: Any, source: Path, files: tuple[FileEntry, ...], options: Any, providers: list[Any],
                 cache: bool) -> Any:
    """An InferenceSession on `source` at `options`' level; through the cache if `cache` (the manifest's
    `cache_optimized_graph`), the level is "all" or "extended" (int8 QDQ graphs: their QDQ fusions and the weight
    quantization folded) and the session runs on the CPU alone. `providers` are names or
    (name, options) pairs, as onnxruntime takes them.

    The first call optimises `source` and saves the result; later calls load the saved graph with optimisations
    off. A cache that cannot be read or written falls back to an ordinary session."""
    level = options.graph_optimization_level
    levels = {ort.GraphOptimizationLevel.ORT_ENABLE_ALL: "", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED: "ext"}
    names = [p if isinstance(p, str) else p[0] for p in providers]
    on_cpu = names == ["CPUExecutionProvider"]
    wanted = cache and level in levels and on_cpu and enabled()
    rewrite = "-".join(t for t in (ort_attention.VERSION if enabled(FUSION_SWITCH) else "", levels.get(level),
                                   PREPACK_VERSION) if t)
    key = cache_key(ort.__version__, files, rewrite) if wanted else None
    if key is None:
        return _session(ort, source, fused_graph(source) if on_cpu else None, options, providers)
    folders = candidate_folders(source, key)
    for folder in folders:
        cached = folder / source.name
        if cached.is_file():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return ort.InferenceSession(os.fspath(cached), options, providers=providers)
            except Exception:  # a damaged cache is rebuilt, not trusted
                shutil.rmtree(folder, ignore_errors=True)
                options.graph_optimization_level = level
    graph = fused_graph(source)
    for folder in folders:
        session = None
        try:
            with atomic_folder(folder) as partial:
                _save_optimized_to(options, partial, source)
                session = _session(ort, source, graph, options, providers)
                for f in partial.iterdir():
                    f.chmod(0o644)  # onnxruntime writes external data owner-only; a bundle is read by whoever renders
        except OSError:  # a read-only place (try the next), or another process published the same graph first
            options.optimized_model_filepath = ""
            if session is not None:
                return session
            continue
        except Exception:  # a full disk, say; a graph that cannot load at all fails again just below
            options.optimized_model_filepath = ""
            break
        return session
    return _session(ort, source, graph, options, providers)


def _prepacking(options: Any) -> bool:
    try:
        return bool(options.get_session_config_entry(DISABLE_PREPACKING) != "1")
    except RuntimeError:  # onnxruntime's answer for an entry never set
        return True


def _save_optimized_to(options: Any, folder: Path, source: Path) -> None:
    # weights go to a data file of their own even where the exported graph holds them inline: it is mapped at
    # load, and only there can onnxruntime keep the packed copies
    options.optimized_model_filepath = os.fspath(folder / source.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", source.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if _prepacking(options):
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")


def cached_graphs(component_dir: Path) -> dict[str, int]:
    """The cached graphs beside a component's graph: key -> bytes on disk (for `edgediff info`)."""
    folder = component_dir / CACHE_FOLDER
    if not folder.is_dir():
        return {}
    return {d.name: sum(f.stat().st_size for f in d.iterdir()) for d in sorted(folder.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


def clear(component_dir: Path) -> None:
    """Remove the cached graphs beside a component's graph (its graph is about to be replaced)."""
    shutil.rmtree(component_dir / CACHE_FOLDER, ignore_errors=True)
