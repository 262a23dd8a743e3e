"""Training checkpoints as one safetensors file each (no pickles), written atomically.

A checkpoint holds the modules' weights, the optimizers' moment tensors and, as JSON metadata, the step and
the optimizers' hyper-parameters: everything a resumed run needs to continue exactly where it stopped (batches
and noise are drawn from per-step seeds; see data.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file


def _module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{prefix}/{index}/{key}"] = torch.as_tensor(value).detach().contiguous().clone()
    return tensors, {"param_groups": state["param_groups"]}


def save(path: Path, step: int, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         extra: dict | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"step": step, "optimizers": {}, "extra": extra or {}}
    for name, module in modules.items():
        tensors.update(_module_tensors(f"module/{name}", module))
    for name, optimizer in optimizers.items():
        opt_tensors, opt_meta = _optimizer_tensors(f"optimizer/{name}", optimizer)
        tensors.update(opt_tensors)
        meta["optimizers"][name] = opt_meta
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"edgediff": json.dumps(meta)})


def load(path: Path, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Restore `modules` and `optimizers` in place from `path`; returns the metadata (step, extra)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["edgediff"])
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"module/{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        prefix = f"optimizer/{name}/"
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                index, entry = key[len(prefix):].split("/", 1)
                state.setdefault(int(index), {})[entry] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizers"][name]["param_groups"]})
    return meta
