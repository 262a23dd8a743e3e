"""torch -> ONNX for one component, then the parity gate (gate.py): ONNX Runtime against PyTorch on the same inputs.

The TorchScript exporter is used (as Optimum does): it traces a full-size U-Net in seconds where the torch.export
path takes minutes and more memory, and its dynamic axes are proven by the gate, which runs a second input shape.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import tempfile
import warnings
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from ..bundle import FileEntry, Parity, SessionOptions
from . import gate
from . import lora_map as lora_maps
from .gate import Check, Tolerance
from .specs import ComponentSpec
from .upsample import fold_upsampling_convs

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
INLINE_BYTES = 1024  # smaller tensors stay in the graph file, as onnx's own external-data writer does
DATA_ALIGNMENT = 64  # each tensor in the data file starts on a cache line
COPY_CHUNK = 64 * 1024**2


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
    module: torch.nn.Module, spec: ComponentSpec, dims: dict[str, int], path: Path, *, opset: int = DEFAULT_OPSET,
    lora_map: bool = False,
) -> tuple[list[Path], SessionOptions]:
    """Export `module` to `path` (model.onnx); weights go to one `model.onnx.data` beside it past
    EXTERNAL_DATA_THRESHOLD. With `lora_map`, also the component's LoRA map (export/lora_map.py), whose weights
    always go to the data file.

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
        # Only the graph is loaded: the weights the exporter wrote to per-tensor files (past 2 GiB) are streamed
        # into the bundle's data file, so a 10 GB SDXL U-Net is never held twice next to its torch module.
        model = onnx.load(str(traced), load_external_data=False)
        pending = lora_maps.match(module, model, Path(scratch)) if lora_map else None
        fold_upsampling_convs(model, Path(scratch), keep=pending.external() if pending else ())
        written, weights = save_graph(model, path, source=Path(scratch),
                                      external=pending.external() if pending else (), consume=True)
        if pending is not None:
            written.append(pending.write(model, path))
        convolutional = any(n.op_type == "Conv" for n in model.graph.node)
        del model
        gc.collect()
    return written, default_ort_options(weights, convolutional)


def graph_tensors(model: onnx.ModelProto):
    """The initializers, and node attribute tensors that an exporter already put in external files (the others
    stay in the graph, as onnx's own writer leaves them)."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and _external(attribute.t) is not None:
                yield attribute.t


def _external(tensor: onnx.TensorProto) -> dict[str, str] | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _nbytes(tensor: onnx.TensorProto, source: Path | None) -> int:
    info = _external(tensor)
    if info is None:
        return len(tensor.raw_data)
    if "length" in info:
        return int(info["length"])
    assert source is not None, "an external tensor needs its graph's folder"
    return (Path(source) / info["location"]).stat().st_size - int(info.get("offset", 0))  # torch's per-tensor files


def save_graph(model: onnx.ModelProto, path: Path, source: Path | None = None,
               external: Collection[str] = (), consume: bool = False) -> tuple[list[Path], int]:
    """Save `model` as `path`, its weights in one `path.data` file past EXTERNAL_DATA_THRESHOLD; the tensors named
    in `external` go there whatever their size (ONNX Runtime replaces only external tensors at load).

    Tensors whose data is still in external files under `source` (the exporter's per-tensor files) are copied
    across in chunks, never loaded whole; with `consume`, each such file is deleted once copied, so that the
    weights are on disk once, not twice, while they move (a 10 GB SDXL U-Net next to its copy needed 21 GB
    free). Returns the files written and the weights' size in bytes; a stale data file from an earlier graph is
    replaced."""
    for t in model.graph.initializer:
        if t.name in external and not t.HasField("raw_data") and _external(t) is None:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))  # typed fields: raw
    tensors = [t for t in graph_tensors(model) if t.HasField("raw_data") or _external(t) is not None]
    weights = sum(_nbytes(t, source) for t in tensors)
    data = path.with_name(path.name + DATA_SUFFIX)
    data.unlink(missing_ok=True)
    large = weights > EXTERNAL_DATA_THRESHOLD
    if large or external:
        with open(data, "wb") as out:
            for t in tensors:
                if t.name not in external and (not large or (_external(t) is None and len(t.raw_data) < INLINE_BYTES)):
                    if _external(t) is not None:
                        _inline(t, source)
                    continue
                out.write(b"\0" * (-out.tell() % DATA_ALIGNMENT))
                offset = out.tell()
                _copy_tensor_data(t, source, out, consume)
                del t.external_data[:]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                    t.external_data.add(key=key, value=str(value))
        onnx.save_model(model, str(path))
        written = [path, data]
    else:
        for t in tensors:
            if _external(t) is not None:
                _inline(t, source)
        onnx.save_model(model, str(path))
        written = [path]
    for f in written:
        f.chmod(0o644)  # a bundle is read by whoever renders
    return written, weights


def _inline(tensor: onnx.TensorProto, source: Path | None) -> None:
    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(source))
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


def _copy_tensor_data(tensor: onnx.TensorProto, source: Path | None, out, consume: bool = False) -> None:
    info = _external(tensor)
    if info is None:
        out.write(tensor.raw_data)
        return
    assert source is not None, "an external tensor needs its graph's folder"
    file = Path(source) / info["location"]
    with open(file, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        left = int(info["length"]) if "length" in info else None
        while left is None or left > 0:
            chunk = f.read(COPY_CHUNK if left is None else min(COPY_CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            if left is not None:
                left -= len(chunk)
    if consume and "offset" not in info and "length" not in info:  # torch's one-tensor files; never a shared one
        file.unlink()


def default_ort_options(weights: int, convolutional: bool = False) -> SessionOptions:
    """How ONNX Runtime should load a graph of `weights` bytes (docs/loading.md).

    Pre-packing stays on, in memory="low" too: it makes the text encoder 1.4x faster, and a cached graph keeps the
    packed weights, so only the first load pays for packing.
    `convolutional`: float32 convolutions, which the "all" level re-lays out for this CPU (fp16 graphs pass False:
    the re-layout is float32-only)."""
    large = weights > LARGE_GRAPH_BYTES
    # cached at either level from the size that gets a data file: the cache keeps the pre-packed weights too, so a
    # cached graph loads without re-packing (the fp32 VAE decoder: 0.1 s against 0.65 s; docs/loading.md)
    return SessionOptions(graph_optimization_level="extended" if large and not convolutional else "all",
                          disable_prepacking=False, cache_optimized_graph=weights > EXTERNAL_DATA_THRESHOLD)


def reference_outputs(module: torch.nn.Module, spec: ComponentSpec, dims_list: list[dict[str, int]]) -> list:
    """PyTorch's outputs on the gate's inputs: a (dims, feeds, outputs) triple per shape, as NumPy arrays.

    Computed before the graph is loaded, so that the caller can free the module first: a full-size SDXL U-Net and
    its ONNX Runtime session (10 GB each) do not fit in 24 GB together."""
    wrapped = spec.wrap(module).eval()
    pairs = []
    for k, dims in enumerate(dims_list):
        feeds = spec.sample(dims, torch.Generator().manual_seed(100 + k))
        with torch.no_grad():
            expected = wrapped(*(feeds[t.name] for t in spec.inputs))
        pairs.append((dims, {n: v.numpy() for n, v in feeds.items()}, [r.float().numpy() for r in expected]))
    return pairs


def check_against_torch(spec: ComponentSpec, path: Path, references: list, tolerance: Tolerance | None = None,
                        ort_options: SessionOptions | None = None, files: tuple[FileEntry, ...] = ()) -> Parity:
    """The parity gate (gate.py) on PyTorch's outputs from reference_outputs: ParityError past the tolerance.

    `files` (the graph's manifest entries) let the gate load it through the graph cache, as the runtime will,
    which leaves the graph optimised for this machine in the bundle. Returns what the manifest records: the worst
    error, the limit it was held to, and the shapes tried."""
    check = Check(spec.name, "ONNX Runtime", "PyTorch", tolerance or gate.FP32_TOLERANCE)
    record = gate.check_graph(check, path, [feeds for _, feeds, _ in references], [out for _, _, out in references],
                              [t.name for t in spec.outputs], ort_options or SessionOptions(), files=files,
                              labels=[str(dims) for dims, _, _ in references])
    return replace(record, shapes=tuple(dims for dims, _, _ in references))

