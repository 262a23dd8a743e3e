"""torch -> ONNX for one component, then the parity gate: ONNX Runtime against PyTorch on the same inputs.

The TorchScript exporter is used (as Optimum does): it traces a full-size U-Net in seconds where the torch.export
path takes minutes and more memory, and its dynamic axes are proven by the gate, which runs a second input shape.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..bundle import FileEntry
from ..runtime import graph_cache
from ..runtime.sessions import CACHE_OPTION, session_options
from .specs import ComponentSpec

DEFAULT_OPSET = 17
# Weights past this size go to one external-data file beside the graph (past 2 GiB protobuf leaves no choice).
# ONNX Runtime memory-maps external data instead of parsing it out of the protobuf: a 1.4 GB text encoder loads in
# 0.2 s instead of 2 s, and pages of weights are shared with the page cache (docs/loading.md).
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2
# Past this much weight, ONNX Runtime's "all" level costs seconds at every load: a text encoder stays at "extended"
# (no convolutions, so "all" adds nothing), a convolutional graph keeps "all" (12 % faster U-Net steps from the
# NCHWc re-layout) and is loaded through runtime/graph_cache.py, which saves the optimised graph once per machine.
LARGE_GRAPH_BYTES = 1024**3
DATA_SUFFIX = ".data"


class ParityError(RuntimeError):
    """An exported component does not reproduce PyTorch within its tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """Max abs error allowed, relative to the reference's largest magnitude (floored at 1)."""

    relative: float

    def limit(self, reference_max: float) -> float:
        return self.relative * max(1.0, reference_max)


FP32_TOLERANCE = Tolerance(relative=2e-3)


@contextlib.contextmanager
def _quiet_exporter():
    # The TorchScript exporter warns about every traced Python bool; the gate, not the warnings, decides.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("torch.onnx")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def export_component(
    module: torch.nn.Module, spec: ComponentSpec, dims: dict[str, int], path: Path, *, opset: int = DEFAULT_OPSET
) -> tuple[list[Path], dict]:
    """Export `module` to `path` (model.onnx); weights go to one `model.onnx.data` beside it past 2 GiB.

    Returns the files written and the ONNX Runtime options the graph should run with."""
    wrapped = spec.wrap(module).eval()
    feeds = spec.sample(dims, torch.Generator().manual_seed(0))
    args = tuple(feeds[t.name] for t in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        traced = Path(scratch) / "model.onnx"
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(
                wrapped,
                args,
                str(traced),
                dynamo=False,
                opset_version=opset,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
            )
        del wrapped, args, feeds
        gc.collect()
        model = onnx.load(str(traced))  # also pulls in the per-tensor files the exporter writes for big models
        written, weights = save_graph(model, path)
        convolutional = any(n.op_type == "Conv" for n in model.graph.node)
        del model
        gc.collect()
    return written, default_ort_options(weights, convolutional)


def save_graph(model: onnx.ModelProto, path: Path) -> tuple[list[Path], int]:
    """Save `model` as `path`, its weights in one `path.data` file past EXTERNAL_DATA_THRESHOLD.

    Returns the files written and the weights' size in bytes. A stale data file from an earlier graph is removed."""
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    external = weights > EXTERNAL_DATA_THRESHOLD
    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    written = [path, data] if external else [path]
    for f in written:
        f.chmod(0o644)  # onnx writes external data owner-only; a bundle is read by whoever renders
    return written, weights


def default_ort_options(weights: int, convolutional: bool = False) -> dict:
    """How ONNX Runtime should load a graph of `weights` bytes (docs/loading.md).

    Pre-packing stays on: it costs ~1-3 s at load but makes the text encoder 1.4x faster; memory="low" sessions
    turn it off, since it keeps a second copy of the matrix weights. `convolutional`: float32 convolutions, which
    the "all" level re-lays out for this CPU (fp16 graphs pass False: the re-layout is float32-only)."""
    large = weights > LARGE_GRAPH_BYTES
    options = {"graph_optimization_level": "extended" if large and not convolutional else "all",
               "disable_prepacking": False}
    if large and convolutional:
        options[CACHE_OPTION] = True
    return options


def check_parity(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: Path,
    dims_list: list[dict[str, int]],
    tolerance: Tolerance | None = None,
    ort_options: dict | None = None,
    files: tuple[FileEntry, ...] = (),
) -> dict:
    """Run the ONNX file and the torch module on the same inputs at each shape; raise ParityError past tolerance.

    `files` (the graph's manifest entries) let the gate load it through the graph cache, as the runtime will, which
    leaves the graph optimised for this machine in the bundle. Returns what the manifest records: the worst error,
    the limit it was held to, and the shapes tried."""
    tolerance = tolerance or FP32_TOLERANCE
    ort_options = ort_options or {}
    wrapped = spec.wrap(module).eval()
    # the gate runs the graph exactly as the runtime will, optimisations included
    options = session_options(ort, ort_options, threads=None, lean=False)
    session = graph_cache.open_session(ort, path, files, options, ["CPUExecutionProvider"],
                                       cache=bool(files and ort_options.get(CACHE_OPTION)))
    worst = {"max_abs_err": 0.0, "limit": 0.0, "output": None}
    for k, dims in enumerate(dims_list):
        feeds = spec.sample(dims, torch.Generator().manual_seed(100 + k))
        with torch.no_grad():
            expected = wrapped(*(feeds[t.name] for t in spec.inputs))
        got = session.run([t.name for t in spec.outputs], {n: v.numpy() for n, v in feeds.items()})
        for out, ref, g in zip(spec.outputs, expected, got):
            ref = ref.float().numpy()
            if ref.shape != g.shape:
                raise ParityError(f"{spec.name}.{out.name}: ONNX shape {g.shape} != PyTorch {ref.shape} at {dims}")
            err = float(np.max(np.abs(ref - g.astype(np.float32))))
            limit = tolerance.limit(float(np.max(np.abs(ref))))
            if not err <= limit:
                raise ParityError(
                    f"{spec.name}.{out.name}: ONNX Runtime differs from PyTorch by {err:.3g} "
                    f"(limit {limit:.3g}) at {dims}; the export is wrong, not written"
                )
            if err / limit >= worst["max_abs_err"] / max(worst["limit"], 1e-30):
                worst = {"max_abs_err": err, "limit": limit, "output": out.name}
    del session
    return {**worst, "relative_tolerance": tolerance.relative, "shapes": dims_list}
