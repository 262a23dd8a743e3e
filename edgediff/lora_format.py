"""LoRA files and the bundle's LoRA maps, as export and runtime both read them: standard library only.

Two key formats, told apart by their keys:
- kohya (sd-scripts, A1111, most community files): `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` for the text encoder. The path is the diffusers module path with dots as underscores, so
  it is matched against the model's own module names (no hand-written key tables to go stale).
- diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight` (or the older `.lora.down.weight`,
  `.lora.up.weight`, and for text encoders `.lora_linear_layer.down.weight`), alpha in the file's
  `lora_adapter_metadata` (else alpha = rank, PEFT's default).

Each layer's delta is scale * alpha / rank * up @ down. The export fuses it into the torch module
(export/lora.py); the runtime adds it to the bundle's weights through the component's LoRA map (runtime/lora.py),
which says where each source layer's weight lies in the exported graph (`LoraMap`, written by export/lora_map.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from .records import BUNDLE_PATH, VERSIONED_ERRORS, BundleError, at_least, read_versioned, to_json

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                      ".lora_linear_layer.up.weight": "up"}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

T = TypeVar("T")
# component -> layer key (kohya: flattened path; diffusers: dotted path) -> {"down", "up", "alpha"}
Layers = dict[str, dict[str, dict[str, Any]]]


class LoraError(BundleError):
    """A LoRA file that cannot be used (unreadable, no layers, or for another model); one line."""


# A LoRA as the APIs take it: "FILE[:SCALE]", a path (scale 1), or (path, scale).
LoraSpec = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], float]]


def as_spec(spec: LoraSpec) -> tuple[Path, float]:
    """(path, scale) from any LoraSpec form."""
    if isinstance(spec, tuple):
        path, scale = spec
        return Path(path), float(scale)
    return parse_lora_arg(os.fspath(spec))


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """FILE[:SCALE]; a colon followed by something that is not a number belongs to the file name."""
    head, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole .safetensors file, or None: its header parses and its tensors lie within the file.
    A download or copy cut short is found here, by reading the header only, instead of as a Rust panic."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            return f"{path}: not a .safetensors file, or cut short ({size} bytes); copy or download it again"
        try:
            header = json.loads(f.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path}: not a .safetensors file (its header is not a safetensors header)"
    if 8 + length + int(end) > size:
        return (f"{path}: cut short ({size} bytes; its header describes {8 + length + int(end)}); copy or download "
                "it again")
    return None


def group_layers(path: Path, state: Mapping[str, T], metadata: Mapping[str, str]) -> tuple[str, Layers]:
    """The file's format ("kohya" or "diffusers") and its complete layers (a down and an up weight each), by
    component; LoraError if it has none."""
    layers: Layers = {}
    if state and all(any(k.startswith(p) for p in KOHYA_PREFIXES) for k in state):
        fmt = "kohya"
        for key, tensor in state.items():
            prefix = max((p for p in KOHYA_PREFIXES if key.startswith(p)), key=len)
            name, _, part = key[len(prefix):].partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part, "")
            if part:
                layers.setdefault(KOHYA_PREFIXES[prefix], {}).setdefault(name, {})[part] = tensor
    else:
        fmt = "diffusers"
        alphas = _metadata_alphas(metadata)
        for key, tensor in state.items():
            suffix = next((s for s in DIFFUSERS_SUFFIXES if key.endswith(s)), None)
            component, _, rest = key.partition(".")
            if suffix is None or not rest:
                continue
            layer = layers.setdefault(component, {}).setdefault(rest[: -len(suffix)], {})
            layer[DIFFUSERS_SUFFIXES[suffix]] = tensor
            if component in alphas:
                layer.setdefault("alpha", alphas[component])
    complete = {c: {k: v for k, v in found.items() if "down" in v and "up" in v} for c, found in layers.items()}
    complete = {c: found for c, found in complete.items() if found}
    if not complete:
        raise LoraError(f"{path}: no LoRA layers in it (no lora_down/lora_up or lora_A/lora_B weight pairs)")
    return fmt, complete


def _metadata_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    """diffusers' save_lora_weights records PEFT's config per component (`unet.lora_alpha`, ...) as JSON."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict):
        return {}
    return {k.split(".")[0]: float(v) for k, v in config.items() if k.endswith(".lora_alpha")}


def check_components(path: Path, layers: Layers, components: Iterable[str]) -> None:
    """Refuse a LoRA for components this model does not have (an SDXL LoRA's te2 on SD 1.x)."""
    extra = sorted(set(layers) - set(components))
    if extra:
        raise LoraError(f"{path}: has layers for {', '.join(extra)}, which this pipeline lacks; it is a LoRA for "
                        "another architecture")


def key_lookup(module_names: Iterable[str], fmt: str) -> dict[str, str]:
    """LoRA layer key -> the model's module name, for a file of format `fmt`."""
    names = [n for n in module_names if n]
    lookup = {n: n for n in names}
    if not any(n.startswith("text_model.") for n in names):
        # transformers 5's CLIPTextModel lost the `text_model.` level that LoRA files (made on 4.x) still name
        lookup.update({f"text_model.{n}": n for n in names})
    if fmt == "kohya":
        lookup = {key.replace(".", "_"): name for key, name in lookup.items()}
    return lookup


def unmatched(path: Path, component: str, keys: list[str], lookup: Mapping[str, str], what: str) -> None:
    """Refuse, naming one, a LoRA whose `component` layer keys are not all in `lookup`."""
    missing = [k for k in keys if k not in lookup]
    if len(missing) == len(keys):
        raise LoraError(f"{path}: none of its {len(keys)} {component} layers matches a layer of this {what} "
                        f"(e.g. {missing[0]}); it is for another model")
    if missing:
        raise LoraError(f"{path}: {len(missing)} of its {len(keys)} {component} layers match nothing in this "
                        f"{what} (e.g. {missing[0]}); it is a LoRA for another architecture")


def delta_shape_problem(path: Path, component: str, key: str, down_shape: tuple[int, ...],
                        up_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """Why up @ down cannot be added to a weight of `weight_shape`, or None."""
    rank = down_shape[0] if down_shape else 0
    fan_in = _product(down_shape[1:])
    fits = (len(up_shape) >= 2 and up_shape[1] == rank and _product(up_shape[2:]) == 1
            and up_shape[0] == weight_shape[0] and up_shape[0] * fan_in == _product(weight_shape))
    if fits:
        return None
    got = (up_shape[0] if up_shape else 0, fan_in)
    return (f"{path}: layer {key} is {tuple(weight_shape)} in this {component}, the LoRA's is {got}; it is a LoRA "
            "for another architecture")


def _product(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# --- the bundle's LoRA map: where each source layer's weight lies in the exported graph --------------------------

MAP_FORMAT = "edgediff-lora-map"
MAP_VERSION = 1
MAP_NAME = "lora_map.json"


@dataclass(frozen=True)
class TensorRef:
    """One initializer of the graph, stored in its external-data file (the runtime reads and replaces it)."""

    name: str
    file: str = field(metadata=BUNDLE_PATH)  # the data file, relative to the bundle
    offset: int = field(metadata=at_least(0))
    dtype: str  # float32, float16, int8
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightPart:
    """The graph tensor that holds rows [rows[0], rows[1]) of a source weight (the split GEGLU gives two parts).
    `layout` "out_in": the tensor's first axis is the source's output rows (Conv, Gemm with transB); "in_out": the
    transpose (a MatMul's weight). int8 parts carry their per-output-channel scale (zero point 0) and range."""

    weight: TensorRef
    layout: Literal["out_in", "in_out"]
    rows: tuple[int, int]
    scale: TensorRef | None = None
    qmin: int | None = None
    qmax: int | None = None


@dataclass(frozen=True)
class MappedLayer:
    shape: tuple[int, ...]  # the source weight's (out, in[, kh, kw])
    parts: tuple[WeightPart, ...] = ()  # none: the exported outputs do not use the layer (a skipped last layer)


@dataclass(frozen=True)
class LoraMap:
    layers: dict[str, MappedLayer] = field(default_factory=dict)  # source module name -> where its weight is


def lora_map_json(lora_map: LoraMap) -> str:
    return json.dumps({"format": MAP_FORMAT, "format_version": MAP_VERSION, **to_json(lora_map)}) + "\n"


def read_lora_map(path: Path) -> LoraMap:
    """The map at `path`; BundleError (one line) if it is not one this edgediff reads."""
    try:
        lora_map: LoraMap = read_versioned(path, MAP_FORMAT, MAP_VERSION, LoraMap, "layers")
    except VERSIONED_ERRORS as e:
        raise BundleError(f"{path}: unreadable LoRA map ({e}); re-export the bundle") from None
    return lora_map
