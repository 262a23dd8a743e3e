"""`edgediff export`: a diffusers checkpoint folder -> an ONNX bundle with its manifest, written atomically."""

from __future__ import annotations

import datetime
import gc
import os
import shutil
from pathlib import Path
from typing import Callable

from .. import __version__
from ..bundle import Component, FileEntry, Manifest, write_manifest
from . import specs
from .checkpoint import Checkpoint, SourceError
from .onnx import DEFAULT_OPSET, check_parity, export_component

# Which torch module each bundle component comes from, and the spec that exports it.
COMPONENTS: dict[str, tuple[str, Callable]] = {
    "text_encoder": ("text_encoder", specs.text_encoder_spec),
    "unet": ("unet", specs.unet_spec),
    "vae_decoder": ("vae", specs.vae_decoder_spec),
    "vae_encoder": ("vae", specs.vae_encoder_spec),
}


def _gate_shapes(ck: Checkpoint) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Shapes to trace at, and the shapes the parity gate checks: two, with every dynamic axis changed."""
    k = ck.size_multiple // ck.latent.downscale  # the smallest latent side the U-Net takes

    def dims(batch, seq, lh, lw):
        f = ck.latent.downscale
        return {"batch": batch, "sequence": seq, "latent_height": lh, "latent_width": lw, "height": lh * f, "width": lw * f}

    return dims(2, 77, 2 * k, 3 * k), [dims(1, 77, k, k), dims(3, 16, 3 * k, 2 * k)]


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "edgediff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export_bundle(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[str], None] | None = None,  # called with each component's name once it is proven
) -> Manifest:
    """Export every component of `src`, prove each against PyTorch, and write the bundle to `out`.

    The bundle is assembled in a temporary folder beside `out` and renamed into place, so an interrupted export
    leaves nothing half-written; an existing `out` is replaced only with `force`."""
    out = Path(out)
    if out.exists() and not force:
        raise SourceError(f"{out} already exists; pass --force to replace it")
    ck = Checkpoint.open(src)
    preset = ck.preset(preset)
    family = ck.family
    scheduler, prediction_type = ck.scheduler(preset)
    tokenizer_files = ck.tokenizer_files()
    trace_dims, gate_dims = _gate_shapes(ck)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        components = {}
        for name, (source, make_spec) in COMPONENTS.items():
            module = ck.load(source)
            spec = make_spec(module)
            path = tmp / name / "model.onnx"
            written, ort_options = export_component(module, spec, trace_dims, path, opset=opset)
            parity = check_parity(module, spec, path, gate_dims, ort_options=ort_options)
            del module
            gc.collect()
            components[name] = Component(
                file=f"{name}/model.onnx",
                precision="fp32",
                inputs=spec.inputs,
                outputs=spec.outputs,
                files=tuple(FileEntry.of(tmp, str(p.relative_to(tmp))) for p in written),
                parity=parity,
                ort_options=ort_options,
            )
            if progress:
                progress(name)
        (tmp / "tokenizer").mkdir()
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / "tokenizer" / f.name)
        manifest = Manifest(
            family=family,
            preset=preset,
            prediction_type=prediction_type,
            scheduler=scheduler,
            latent=ck.latent,
            size_multiple=ck.size_multiple,
            defaults=ck.defaults(preset),
            components=components,
            tokenizer={
                "path": "tokenizer",
                "kind": "clip",
                "files": tuple(FileEntry.of(tmp, f"tokenizer/{f.name}") for f in tokenizer_files),
            },
            guidance_embedding_dim=ck.guidance_embedding_dim,
            provenance={
                "source": str(src),
                "source_pipeline": ck.index.get("_class_name"),
                "opset": opset,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(),
            },
        )
        write_manifest(tmp, manifest)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first and removed only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
