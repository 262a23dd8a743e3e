"""The LoRA map of an exported component (lora_format.LoraMap): which graph tensor holds each source layer's weight.

The exporter renames weights (a torch Linear's weight becomes a MatMul's transposed `onnx::MatMul_123`), edgediff
splits each GEGLU projection into two linears, and fp16 / int8 conversion renames them again. So the map is made
from the values, not the names: each Linear / Conv2d weight of the traced module is found among the graph's
initializers (as it is, or transposed), and the op that reads it says which layout that is. A conversion keeps the
nodes, so the converted graph's tensor is found through the same node inputs. Every tensor the map names is written
to the external-data file, where the runtime reads it and ONNX Runtime takes its replacement
(`SessionOptions.add_external_initializers`), and the map records its offset there.

A source layer whose weight is nowhere in the graph because the exported outputs do not use it (the last text
encoder layer under SDXL's hidden_states[-2]) is listed with no parts; one whose weight cannot be found while its
nodes are in the graph is left out, so a LoRA that touches it is refused rather than silently not applied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..lora_format import MAP_NAME, LoraMap, MappedLayer, TensorRef, WeightPart, lora_map_json, read_lora_map

# The op that reads a weight and input index -> the layout it is in (Gemm: by its transB).
_READERS = {("Conv", 1): "out_in", ("MatMul", 1): "in_out"}


@dataclass(frozen=True)
class Part:
    """A WeightPart before the graph is saved (no file offsets yet)."""

    weight: str
    layout: str
    rows: tuple[int, int]
    scale: str | None = None
    qrange: tuple[int, int] | None = None


@dataclass
class PendingMap:
    """Source layer -> (its weight's shape, its parts); written as the map once the graph is saved."""

    layers: dict[str, tuple[tuple[int, ...], list[Part]]]

    def external(self) -> set[str]:
        """The tensors that must go to the external-data file."""
        names = {p.weight for _, parts in self.layers.values() for p in parts}
        return names | {p.scale for _, parts in self.layers.values() for p in parts if p.scale}

    def write(self, model: onnx.ModelProto, graph: Path) -> Path:
        """The map of the saved `graph` (`model` as save_graph left it: external tensors with their offsets)."""
        tensors = {t.name: t for t in model.graph.initializer}
        folder = graph.parent.name

        def ref(name: str) -> TensorRef:
            t = tensors[name]
            info = {e.key: e.value for e in t.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
            return TensorRef(name, f"{folder}/{info['location']}", int(info.get("offset", 0)), dtype, tuple(t.dims))

        layers = {name: MappedLayer(shape, tuple(
            WeightPart(ref(p.weight), p.layout, p.rows,  # type: ignore[arg-type]  # "out_in" / "in_out"
                       ref(p.scale) if p.scale else None, *(p.qrange or (None, None))) for p in parts))
                  for name, (shape, parts) in sorted(self.layers.items())}
        path = graph.with_name(MAP_NAME)
        path.write_text(lora_map_json(LoraMap(layers)))
        path.chmod(0o644)
        return path


def source_layers(module) -> dict[str, tuple[tuple[int, ...], list[tuple[str, np.ndarray, int]]]]:
    """Source layer name -> (weight shape, [(module path in the traced module, weight, first row)]): every Linear
    and Conv2d, a split GEGLU as the projection it replaced."""
    import torch

    layers: dict = {}
    inside_split: tuple[str, ...] = ()
    for name, m in module.named_modules():
        if inside_split and name.startswith(inside_split):
            continue
        if hasattr(m, "source_parts"):
            inside_split = (f"{name}.",)
            parts = [(f"{name}.{child}", linear.weight.detach().numpy(), row) for child, linear, row in
                     m.source_parts()]
            rows = sum(w.shape[0] for _, w, _ in parts)
            layers[f"{name}.{m.source_name}"] = ((rows, *parts[0][1].shape[1:]), parts)
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            weight = m.weight.detach().numpy()
            layers[name] = (tuple(weight.shape), [(name, weight, 0)])
    return layers


def _key(array: np.ndarray) -> tuple:
    data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    return array.dtype.str, array.shape, hashlib.blake2b(bytes(data[:4096]) + bytes(data[-4096:])).hexdigest()


def _array(tensor: onnx.TensorProto, source: Path | None) -> np.ndarray:
    info = {e.key: e.value for e in tensor.external_data}
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    assert source is not None, "an external tensor needs its graph's folder"
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    # mapped, not read: the key looks at 8 KiB of each weight, and only candidates are compared in full
    return np.memmap(source / info["location"], dtype, "r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims))


def _readers(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    return readers


def _layout(readers: list[tuple[onnx.NodeProto, int]]) -> str | None:
    """The layout every reader of a weight takes it in, or None (no readers, or they disagree)."""
    layouts: set[str | None] = set()
    for node, index in readers:
        if node.op_type == "Gemm" and index == 1:
            trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
            layouts.add("out_in" if trans else "in_out")
        else:
            layouts.add(_READERS.get((node.op_type, index)))
    return layouts.pop() if len(layouts) == 1 else None


def match(module, model: onnx.ModelProto, source: Path | None) -> PendingMap:
    """Find each source layer's weight among the traced graph's float initializers (see the module docstring)."""
    index: dict[tuple, list[onnx.TensorProto]] = {}
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            index.setdefault(_key(_array(t, source)), []).append(t)
    readers = _readers(model)
    nodes = "\n".join(n.name for n in model.graph.node)
    claimed: dict[str, list[str]] = {}
    layers: dict[str, tuple[tuple[int, ...], list[Part]]] = {}
    unused, scoped = [], False
    for name, (shape, pieces) in source_layers(module).items():
        parts = []
        for _, weight, row in pieces:
            part = _find(weight, index, readers, source, (row, row + weight.shape[0]))
            if part is not None:
                parts.append(part)
                claimed.setdefault(part.weight, []).append(name)
        in_graph = any(_scope(path) in nodes for path, _, _ in pieces)
        scoped = scoped or (in_graph and len(parts) == len(pieces))
        if len(parts) == len(pieces):
            layers[name] = (shape, parts)
        elif not parts and not in_graph:
            unused.append((name, shape))
    if scoped:  # the exporter named nodes by module scope, so a layer without nodes is truly unused
        layers.update({name: (shape, []) for name, shape in unused})
    shared = {n for names in claimed.values() if len(names) > 1 for n in names}  # one tensor, several layers
    return PendingMap({k: v for k, v in layers.items() if k not in shared})


def _scope(path: str) -> str:
    """How the TorchScript exporter names a module's nodes: `/down_blocks.0/attentions.0/.../to_q/`."""
    out: list[str] = []
    for piece in path.split("."):
        if piece.isdigit() and out:
            out[-1] += f".{piece}"
        else:
            out.append(piece)
    return "/" + "/".join(out) + "/"


def _find(weight: np.ndarray, index, readers, source: Path | None, rows: tuple[int, int]) -> Part | None:
    for layout, candidate in (("out_in", weight), ("in_out", weight.T if weight.ndim == 2 else None)):
        if candidate is None:
            continue
        for t in index.get(_key(candidate), []):
            if _layout(readers.get(t.name, [])) == layout and np.array_equal(_array(t, source), candidate):
                return Part(t.name, layout, rows)
    return None


class Follower:
    """The map of a graph about to be converted (fp16, int8), carried over to the converted graph through the nodes
    that read each weight: the conversions keep the nodes and their names, and put a Cast (fp16 islands) or a
    DequantizeLinear (int8) between a weight and its reader."""

    def __init__(self, graph: Path, qrange: tuple[int, int] | None = None):
        self.graph = graph
        self.qrange = qrange
        fp32 = read_lora_map(graph.with_name(MAP_NAME))
        readers = _readers(onnx.load(str(graph), load_external_data=False))
        self.before = {name: (layer.shape, [(p, [(n.name, i) for n, i in readers.get(p.weight.name, [])])
                                            for p in layer.parts]) for name, layer in fp32.layers.items()}
        self.pending = PendingMap({})

    def resolve(self, model: onnx.ModelProto) -> set[str]:
        """Map the converted `model` (in memory, before it is saved); returns the tensors to keep external."""
        tensors = {t.name: t for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        producers = {o: n for n in model.graph.node for o in n.output}
        layers = {}
        for name, (shape, parts) in self.before.items():
            found = [self._part(p, readers, nodes, tensors, producers) for p, readers in parts]
            if all(f is not None for f in found):
                layers[name] = (shape, [f for f in found if f is not None])
        self.pending = PendingMap(layers)
        return self.pending.external()

    def _part(self, part: WeightPart, readers: Iterable[tuple[str, int]], nodes, tensors, producers) -> Part | None:
        found = set()
        for node_name, i in readers:
            node = nodes.get(node_name)
            found.add(self._tensor(node.input[i], part, tensors, producers) if node is not None else None)
        return found.pop() if len(found) == 1 else None

    def _tensor(self, name: str, part: WeightPart, tensors, producers) -> Part | None:
        if name in tensors:
            return Part(name, part.layout, part.rows)
        node = producers.get(name)
        if node is not None and node.op_type == "Cast" and node.input[0] in tensors:
            return Part(node.input[0], part.layout, part.rows)
        if node is None or node.op_type != "DequantizeLinear" or self.qrange is None:
            return None
        weight, scale, *zero = node.input
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        channels = part.rows[1] - part.rows[0]
        ok = (weight in tensors and scale in tensors and axis == (0 if part.layout == "out_in" else 1)
              and tuple(tensors[scale].dims) == (channels,)
              and (not zero or (zero[0] in tensors and not numpy_helper.to_array(tensors[zero[0]]).any())))
        return Part(weight, part.layout, part.rows, scale, self.qrange) if ok else None

    def write(self, model: onnx.ModelProto) -> Path:
        return self.pending.write(model, self.graph)
