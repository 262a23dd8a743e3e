"""LoRA files fused into the U-Net and text encoder weights before export: W += scale * alpha / rank * up @ down.

Two formats, told apart by their keys:
- kohya (sd-scripts, A1111, most community files): `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`; `lora_te_` for the text encoder. The path is the diffusers module path with dots as underscores, so
  it is matched against the loaded module's own names (no hand-written key tables to go stale).
- diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight` (or the older `.lora.down.weight`,
  `.lora.up.weight`, and for text encoders `.lora_linear_layer.down.weight`), alpha in the file's
  `lora_adapter_metadata` (else alpha = rank, PEFT's default).

Fusing is done on the torch module, so the parity gate then proves the exported graph against the fused weights.
A LoRA none of whose layers exist in the model, or whose layers exist with other shapes, is refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import LoraRecord
from ..bundle_files import sha256_file
from .checkpoint import SourceError, refuse_pickle
from .preflight import check_safetensors

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                      ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                      ".lora_linear_layer.up.weight": "up"}


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


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """FILE[:SCALE]; a colon followed by something that is not a number belongs to the file name."""
    head, sep, tail = arg.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def read_lora(path: Path, scale: float = 1.0, *, allow_pickle: bool = False) -> Lora:
    if not path.is_file():
        raise SourceError(f"{path}: no such LoRA file")
    state, metadata = _load(path, allow_pickle)
    if all(any(k.startswith(p) for p in KOHYA_PREFIXES) for k in state):
        lora = Lora(path, scale, "kohya")
        for key, tensor in state.items():
            prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
            name, _, part = key[len(prefix):].partition(".")
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
            if part:
                lora.layers.setdefault(KOHYA_PREFIXES[prefix], {}).setdefault(name, {})[part] = tensor
    else:
        lora = Lora(path, scale, "diffusers")
        alphas = _metadata_alphas(metadata)
        for key, tensor in state.items():
            suffix = next((s for s in DIFFUSERS_SUFFIXES if key.endswith(s)), None)
            component, _, rest = key.partition(".")
            if suffix is None or not rest:
                continue
            layer = lora.layers.setdefault(component, {}).setdefault(rest[: -len(suffix)], {})
            layer[DIFFUSERS_SUFFIXES[suffix]] = tensor
            if component in alphas:
                layer.setdefault("alpha", alphas[component])
    complete = {c: {k: v for k, v in layers.items() if "down" in v and "up" in v} for c, layers in lora.layers.items()}
    lora.layers = {c: layers for c, layers in complete.items() if layers}
    if not lora.layers:
        raise SourceError(f"{path}: no LoRA layers in it (no lora_down/lora_up or lora_A/lora_B weight pairs)")
    return lora


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


def _metadata_alphas(metadata: dict) -> dict[str, float]:
    """diffusers' save_lora_weights records PEFT's config per component (`unet.lora_alpha`, ...) as JSON."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    return {k.split(".")[0]: float(v) for k, v in config.items() if k.endswith(".lora_alpha")}


def check_components(loras: Sequence[Lora], components: set[str]) -> None:
    """Refuse, before anything is exported, a LoRA for components this pipeline does not have (SDXL's te2)."""
    for lora in loras:
        extra = sorted(set(lora.layers) - components)
        if extra:
            raise SourceError(f"{lora.path}: has layers for {', '.join(extra)}, which this pipeline lacks; "
                              "it is a LoRA for another architecture")


def fuse(module, component: str, loras: Sequence[Lora]) -> None:
    """Add every LoRA's layers for `component` into `module`'s weights, in place."""
    import torch

    for lora in loras:
        layers = lora.layers.get(component)
        if not layers:
            continue
        named = dict(module.named_modules())
        if not hasattr(module, "text_model"):
            # transformers 5's CLIPTextModel lost the `text_model.` level that LoRA files (made on 4.x) still name
            named.update({f"text_model.{name}": m for name, m in list(named.items()) if name})
        if lora.format == "kohya":
            named = {name.replace(".", "_"): m for name, m in named.items()}
        missing = [k for k in layers if k not in named or not hasattr(named[k], "weight")]
        if len(missing) == len(layers):
            raise SourceError(f"{lora.path}: none of its {len(layers)} {component} layers matches a layer of this "
                              f"{component} (e.g. {missing[0]}); it is for another model")
        if missing:
            raise SourceError(f"{lora.path}: {len(missing)} of its {len(layers)} {component} layers match nothing "
                              f"(e.g. {missing[0]}); it is a LoRA for another architecture")
        with torch.no_grad():
            for key, layer in layers.items():
                weight = named[key].weight
                down, up = layer["down"].float(), layer["up"].float()
                rank = down.shape[0]
                delta = (up.flatten(1) @ down.flatten(1))
                if delta.numel() != weight.numel() or delta.shape[0] != weight.shape[0]:
                    raise SourceError(f"{lora.path}: layer {key} is {tuple(weight.shape)} in this {component}, the "
                                      f"LoRA's is {tuple(delta.shape)}; it is a LoRA for another architecture")
                alpha = float(layer.get("alpha", rank))
                weight += (lora.scale * alpha / rank) * delta.reshape(weight.shape).to(weight.dtype)
        lora.fused[component] = len(layers)
