"""Run-time LoRA: LoRA files added to a bundle's weights in NumPy and handed to the sessions as replacements.

Each component exported with a LoRA map (lora_format.LoraMap) says where every source layer's weight lies in its
graph's external-data file. A LoRA layer's delta, scale * alpha / rank * up @ down (the formats as the export
reads them, lora_format.py), is added to that weight as the bundle stores it: fp32 and fp16 weights in their own
dtype, int8 weights dequantized, changed and quantized again per output channel in the bundle's own scheme
(symmetric, the range the map records). The results replace the graph's initializers when the session is created
(SessionSettings.initializers), so the bundle's files are read, never written, and stay memory-mapped.

Everything is checked before anything changes: a LoRA for a component the bundle lacks, a layer the map does not
know, a shape that differs, or a bundle without maps is refused in one line, and nothing is half-applied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Manifest
from ..lora_format import (
    Layers,
    LoraError,
    LoraMap,
    LoraSpec,
    MappedLayer,
    TensorRef,
    WeightPart,
    as_spec,
    check_components,
    delta_shape_problem,
    group_layers,
    key_lookup,
    read_lora_map,
    safetensors_problem,
    unmatched,
)

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
OLD_BUNDLE = ("was exported without LoRA maps (by an edgediff before run-time LoRA); re-export it with this edgediff "
              "(`edgediff export`) to use run-time LoRA, or fuse the LoRA at export (`edgediff export --lora`)")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file, read: its layers' arrays by component (lora_format.Layers), and the scale it runs at."""

    path: Path
    scale: float
    format: str
    layers: Layers = field(repr=False)
    stamp: tuple[str, int, int] = ("", 0, 0)  # resolved path, size, mtime: what tells a changed file


@dataclass(frozen=True)
class LayerLoras:
    """One source layer the LoRAs touch: where its weight is, and each LoRA's (file, down/up/alpha) for it."""

    name: str
    mapped: MappedLayer
    loras: tuple[tuple[LoraFile, dict[str, Any]], ...]


def read_lora(path: Path, scale: float = 1.0) -> LoraFile:
    """A .safetensors LoRA file, read with NumPy (bf16 widened to float32); LoraError (one line) if unusable."""
    if not path.is_file():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: run-time LoRAs are read from .safetensors files only (no pickles); convert it, or "
                        "fuse it at export (`edgediff export --lora FILE --allow-pickle`)")
    problem = safetensors_problem(path)
    if problem:
        raise LoraError(problem)
    if not np.isfinite(scale):
        raise LoraError(f"{path}: scale {scale} is not a finite number")
    state, metadata = _read_safetensors(path)
    fmt, layers = group_layers(path, state, metadata)
    info = path.stat()
    return LoraFile(path, scale, fmt, layers, (str(path.resolve()), info.st_size, info.st_mtime_ns))


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (memory-mapped) and metadata of a file safetensors_problem accepted."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    data = np.memmap(path, np.uint8, "r", offset=8 + length) if path.stat().st_size > 8 + length else np.zeros(0)
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise LoraError(f"{path}: tensor {key} is {entry.get('dtype')}, which a LoRA does not hold")
        start, end = entry["data_offsets"]
        array = data[start:end].view(dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":  # bfloat16 is float32's upper half
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array
    metadata = header.get("__metadata__") or {}
    return tensors, metadata if isinstance(metadata, dict) else {}


def lora_maps(root: Path, manifest: Manifest, components: Sequence[str]) -> dict[str, LoraMap]:
    """The LoRA maps of `components`; LoraError for a bundle exported without them."""
    maps = {}
    for name in components:
        component = manifest.components[name]
        if component.lora_map is None:
            raise LoraError(f"{root}: {name} {OLD_BUNDLE}")
        maps[name] = read_lora_map(root / component.lora_map)
        listed = {f.path for f in component.files}  # checked at load: present, confined, fingerprinted
        stray = {ref.file for layer in maps[name].layers.values() for part in layer.parts
                 for ref in (part.weight, part.scale) if ref is not None} - listed
        if stray:
            raise LoraError(f"{root}: {name}'s LoRA map points at {sorted(stray)[0]}, which is not among its files; "
                            "re-export the bundle")
    return maps


def match_layers(root: Path, manifest: Manifest, loras: Sequence[LoraFile]) -> dict[str, list[LayerLoras]]:
    """Every layer the LoRAs touch, by component, each checked against the bundle's maps; LoraError (one line, naming
    what did not match) for a LoRA this bundle cannot take. Nothing is read from the bundle's weights yet."""
    lora_components = [e.component for e in manifest.text_encoders] + ["unet"]
    for lora in loras:
        check_components(lora.path, lora.layers, lora_components)
    wanted = sorted({c for lora in loras for c in lora.layers}, key=lora_components.index)
    maps = lora_maps(root, manifest, wanted)
    touched: dict[str, dict[str, list[tuple[LoraFile, dict[str, Any]]]]] = {name: {} for name in wanted}
    for lora in loras:
        for component, layers in lora.layers.items():
            lookup = key_lookup(maps[component].layers, lora.format)
            unmatched(lora.path, component, list(layers), lookup, f"bundle's {component}")
            for key, layer in layers.items():
                name = lookup[key]
                problem = delta_shape_problem(lora.path, component, key, tuple(layer["down"].shape),
                                              tuple(layer["up"].shape), maps[component].layers[name].shape)
                if problem:
                    raise LoraError(problem)
                touched[component].setdefault(name, []).append((lora, layer))
    return {c: [LayerLoras(n, maps[c].layers[n], tuple(found)) for n, found in layers.items()]
            for c, layers in touched.items()}


def new_weights(root: Path, layers: Sequence[LayerLoras]) -> dict[str, np.ndarray]:
    """The replaced initializers of one component: each touched weight with its LoRAs' deltas added."""
    weights: dict[str, np.ndarray] = {}
    for layer in layers:
        if not layer.mapped.parts:
            continue  # the exported outputs do not use this layer: its delta changes nothing
        delta = _delta(layer)
        for part in layer.mapped.parts:
            weights.update(_apply(root, part, delta, layer.mapped.shape))
    return weights


def _delta(layer: LayerLoras) -> np.ndarray:
    """The sum of every LoRA's scale * alpha / rank * up @ down for this layer, as (out, fan_in) float32."""
    total: np.ndarray | None = None
    for lora, parts in layer.loras:
        down = np.asarray(parts["down"], np.float32)
        down = down.reshape(down.shape[0], -1)
        up = np.asarray(parts["up"], np.float32)
        up = up.reshape(up.shape[0], -1)
        rank = down.shape[0]
        alpha = float(np.asarray(parts.get("alpha", rank), np.float64))
        delta: np.ndarray = np.float32(lora.scale * alpha / rank) * (up @ down)
        total = delta if total is None else total + delta
    assert total is not None, "a touched layer has a LoRA"
    return total


def _read(root: Path, ref: TensorRef) -> np.ndarray:
    path = root / ref.file
    dtype = np.dtype(ref.dtype)
    count = int(np.prod(ref.shape))
    if ref.offset + count * dtype.itemsize > path.stat().st_size:
        raise LoraError(f"{path}: {ref.name} lies past the end of the file; re-export the bundle")
    mapped: np.ndarray = np.memmap(path, dtype, "r", offset=ref.offset, shape=tuple(ref.shape))
    return mapped


def _apply(root: Path, part: WeightPart, delta: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The part's tensor (and, int8, its scale) with the delta's rows for it added, in the bundle's layout."""
    start, stop = part.rows
    change = delta[start:stop].reshape((stop - start, *shape[1:]))
    if part.layout == "in_out":
        change = change.T
    base = _read(root, part.weight)
    if change.shape != base.shape:
        raise LoraError(f"{root}: {part.weight.name} is {base.shape} in the graph, its LoRA map says "
                        f"{change.shape}; re-export the bundle")
    if part.scale is None:
        return {part.weight.name: (base.astype(np.float32) + change).astype(base.dtype)}
    if part.qmin is None or part.qmax is None:
        raise LoraError(f"{root}: {part.weight.name} is int8 without its range in the LoRA map; re-export the bundle")
    axis = 0 if part.layout == "out_in" else 1  # the output channels, which the scales run along
    channel = [1] * base.ndim
    channel[axis] = -1
    weight = base.astype(np.float32) * _read(root, part.scale).astype(np.float32).reshape(channel) + change
    q, scale = quantize_per_channel(weight, axis, part.qmin, part.qmax)
    return {part.weight.name: q, part.scale.name: scale}


def quantize_per_channel(weight: np.ndarray, axis: int, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel, as onnxruntime's quantizer computes it (quant_utils.compute_scale_zp and
    quantize_nparray): scale = 2 max|w| / (qmax - qmin) in float64 then float32, q = round(w / scale), zero point 0."""
    others = tuple(i for i in range(weight.ndim) if i != axis)
    absmax = np.maximum(np.abs(np.minimum(weight.min(axis=others), 0)), np.maximum(weight.max(axis=others), 0))
    scale = (2 * absmax.astype(np.float64) / (qmax - qmin)).astype(np.float32)
    scale = np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), scale).astype(np.float32)
    channel = [1] * weight.ndim
    channel[axis] = -1
    q = np.clip((weight / scale.reshape(channel)).round(), qmin, qmax).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class LoraSet:
    """A set of LoRAs checked against one bundle: the files, the layers they touch by component, what tells a
    component's LoRAs apart, and the components whose LoRAs differ from the set before."""

    files: tuple[LoraFile, ...] = ()
    touched: dict[str, list[LayerLoras]] = field(default_factory=dict, repr=False)
    stamps: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # component -> its LoRAs' (file, scale)
    changed: tuple[str, ...] = ()

    @property
    def layers(self) -> dict[str, int]:
        return {c: len(found) for c, found in self.touched.items()}


@dataclass(frozen=True)
class LoraSwitch:
    """What `Pipeline.set_loras` did, and how long it took."""

    loras: tuple[tuple[str, float], ...]  # (file, scale), in order
    layers: dict[str, int]  # component -> layers the LoRAs touch
    rebuilt: tuple[str, ...]  # components whose sessions were rebuilt (memory="low": will be, when next used)
    weights_seconds: float  # reading the LoRAs and adding them to the weights
    seconds: float  # all of it, the sessions included

    def describe(self) -> str:
        touched = ", ".join(f"{c} {n} layers" for c, n in self.layers.items()) or "no LoRA"
        rebuilt = ", ".join(self.rebuilt) or "nothing"
        return (f"LoRA: {touched}; rebuilt {rebuilt} in {self.seconds:.2f} s (weights {self.weights_seconds:.2f} s)")


class LoraState:
    """The LoRAs a pipeline runs with, and the weights they replace, by component."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.current = LoraSet()
        self.weights: dict[str, dict[str, np.ndarray]] = {}

    def prepare(self, specs: Sequence[LoraSpec]) -> LoraSet:
        """Read and check `specs` against the bundle; nothing changes here, so a refused LoRA leaves the pipeline
        as it was."""
        files = tuple(read_lora(*as_spec(s)) for s in specs)
        touched = match_layers(self.root, self.manifest, files) if files else {}
        stamps = {c: tuple((f.stamp, f.scale) for f in files if c in f.layers) for c in touched}
        old = self.current.stamps
        changed = tuple(c for c in self.manifest.components if stamps.get(c) != old.get(c))
        return LoraSet(files, touched, stamps, changed)

    def apply(self, new: LoraSet) -> None:
        """Run with `new` from now on: the weights of its changed components are dropped, then made anew (so that
        the old and the new are never held together)."""
        for component in new.changed:
            self.weights.pop(component, None)
        self.current = LoraSet()  # until every weight is made
        for component in new.changed:
            if component in new.touched:
                self.weights[component] = new_weights(self.root, new.touched[component])
        self.current = new

    def switch(self, new: LoraSet, weights_seconds: float, seconds: float) -> LoraSwitch:
        return LoraSwitch(tuple((str(f.path), f.scale) for f in new.files), new.layers, new.changed,
                          weights_seconds, seconds)
