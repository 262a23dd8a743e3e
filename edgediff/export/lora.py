"""LoRA files fused into the U-Net and text encoder weights before export: W += scale * alpha / rank * up @ down.

The key formats (kohya, diffusers / PEFT) are read by lora_format.py, which the runtime's LoRA reader shares.
Fusing is done on the torch module, so the parity gate then proves the exported graph against the fused weights.
A LoRA none of whose layers exist in the model, or whose layers exist with other shapes, is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import LoraRecord
from ..bundle_files import sha256_file
from ..lora_format import check_components as check_layer_components
from ..lora_format import delta_shape_problem, group_layers, key_lookup, unmatched
from .checkpoint import SourceError, refuse_pickle
from .preflight import check_safetensors


@dataclass
class Lora:
    path: Path
    scale: float
    format: str  # "kohya" or "diffusers"
    # component -> layer key (kohya: flattened path; diffusers: dotted path) -> {"down", "up", "alpha"}
    layers: dict[str, dict[str, dict]] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)

    def provenance(self) -> LoraRecord:
        return LoraRecord(file=self.path.name, sha256=sha256_file(self.path), scale=self.scale, format=self.format,
                          layers=dict(self.fused))


def read_lora(path: Path, scale: float = 1.0, *, allow_pickle: bool = False) -> Lora:
    if not path.is_file():
        raise SourceError(f"{path}: no such LoRA file")
    state, metadata = _load(path, allow_pickle)
    fmt, layers = group_layers(path, state, metadata)
    return Lora(path, scale, fmt, layers)


def _load(path: Path, allow_pickle: bool):
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        check_safetensors(path)  # a garbage or cut-short file is refused here, by name, not as a Rust panic
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    refuse_pickle(path, allow_pickle)
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle raises anything from EOFError to RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SourceError(f"{path}: not a readable LoRA file ({first})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise SourceError(f"{path}: not a LoRA file (no name -> tensor mapping in it)")
    return state, {}


def check_components(loras: Sequence[Lora], components: set[str]) -> None:
    """Refuse, before anything is exported, a LoRA for components this pipeline does not have (SDXL's te2)."""
    for lora in loras:
        check_layer_components(lora.path, lora.layers, components)


def fuse(module, component: str, loras: Sequence[Lora]) -> None:
    """Add every LoRA's layers for `component` into `module`'s weights, in place."""
    import torch

    for lora in loras:
        layers = lora.layers.get(component)
        if not layers:
            continue
        named = dict(module.named_modules())
        lookup = {key: named[name] for key, name in key_lookup(named, lora.format).items()
                  if hasattr(named[name], "weight")}
        unmatched(lora.path, component, list(layers), lookup, component)
        with torch.no_grad():
            for key, layer in layers.items():
                weight = lookup[key].weight
                down, up = layer["down"].float(), layer["up"].float()
                problem = delta_shape_problem(lora.path, component, key, tuple(down.shape), tuple(up.shape),
                                              tuple(weight.shape))
                if problem:
                    raise SourceError(problem)
                rank = down.shape[0]
                delta = up.flatten(1) @ down.flatten(1)
                alpha = float(layer.get("alpha", rank))
                weight += (lora.scale * alpha / rank) * delta.reshape(weight.shape).to(weight.dtype)
        lora.fused[component] = len(layers)
