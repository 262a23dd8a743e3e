"""`edgediff export`: a diffusers checkpoint folder -> an ONNX bundle with its manifest, written atomically."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import gc
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from .. import __version__
from ..atomic import atomic_folder, scratch_folder
from ..bundle import (
    DEFAULT_MAX_BATCH,
    PREDICTION_TYPES,
    Component,
    FileEntry,
    Manifest,
    Provenance,
    TextEncoder,
    TokenizerRecord,
    default_axis_ranges,
    write_manifest,
)
from ..lora_format import KOHYA_PREFIXES as LORA_COMPONENTS
from ..lora_format import MAP_NAME, LoraSpec, as_spec
from . import PRECISIONS, flow_families, preflight, specs, specs_flow
from .calibrate import Calibration, Phase, describe, record_trajectories
from .checkpoint import Checkpoint, SourceError, single_file_to_folder
from .lora import Lora, check_components, fuse, read_lora
from .onnx import DEFAULT_OPSET, check_against_torch, export_component, reference_outputs
from .precision import convert_component
from .tokenizer import TOKENIZER_FILE, save_canonical_tokenizer

# Which torch module each bundle component comes from, and the spec that exports it; the text encoders come
# first, one per manifest TextEncoder record (plan_components).
COMPONENTS: dict[str, tuple[str, Callable]] = {
    "text_encoder": ("text_encoder", specs.text_encoder_spec),
    "unet": ("unet", specs.unet_spec),
    "vae_decoder": ("vae", specs.vae_decoder_spec),
    "vae_encoder": ("vae", specs.vae_encoder_spec),
}


def plan_components(encoders: tuple[TextEncoder, ...], flow_family: str | None = None
                    ) -> dict[str, tuple[str, Callable]]:
    """COMPONENTS with each text encoder's spec set to output the hidden state its record names; for SD3 / FLUX
    (`flow_family`), T5's spec for the encoder without a pooled output and the transformer in the U-Net's place."""
    def spec(e: TextEncoder) -> Callable:
        if flow_family is not None and e.pooled_output is None:
            return functools.partial(specs_flow.t5_encoder_spec, name=e.component)
        return functools.partial(specs.text_encoder_spec, name=e.component, layer=e.layer,
                                 final_layer_norm=e.final_layer_norm)

    text = {e.component: (e.component, spec(e)) for e in encoders}
    rest = {k: v for k, v in COMPONENTS.items() if k != "text_encoder"}
    if flow_family is not None:
        del rest["unet"]
        rest = {"transformer": ("transformer", specs_flow.TRANSFORMER_SPECS[flow_family]), **rest}
    return {**text, **rest}


def conversion_targets(precision: str, components=COMPONENTS, keep_fp32=(), t5: str | None = None
                       ) -> dict[str, str]:
    """Which components a bundle precision converts, and to what; the rest (and `keep_fp32`) stay fp32.

    int8 pays where the compute is (the U-Net's steps, the VAE decode); CLIP runs once per render and the VAE encoder
    only for img2img, so they keep fp32's accuracy. T5 (component `t5`) runs once too, but at 4.7 B parameters it
    holds a third of FLUX's weights and most of SD3's: int8 takes it for memory. int4 is for memory only: the
    transformer and T5 hold nearly all of SD3's and FLUX's weights, and their MatMuls are what it quantizes."""
    if precision == "int4":
        targets = {name: "int4" for name in ("transformer", t5 or "") if name in components}
    elif precision == "int8":
        targets = {"transformer" if "transformer" in components else "unet": "int8", "vae_decoder": "int8",
                   **({t5: "int8"} if t5 is not None and t5 in components else {})}
    elif precision == "fp16":
        targets = {name: "fp16" for name in components}
    else:
        targets = {}
    return {name: target for name, target in targets.items() if name not in keep_fp32}


FP16_UNSAFE_VAE = "the SDXL VAE overflows in fp16 (its config asks for force_upcast); export with a fp16-safe VAE"


def kept_fp32(ck: Checkpoint, precision: str, tiny_vae) -> dict[str, str]:
    """Components a fp16 bundle keeps in fp32, with the reason the manifest records."""
    if precision != "fp16" or not ck.vae_overflows_fp16:
        return {}
    return {"vae_encoder": FP16_UNSAFE_VAE, **({} if tiny_vae else {"vae_decoder": FP16_UNSAFE_VAE})}


def _gate_shapes(ck: Checkpoint) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Shapes to trace at, and the shapes the parity gate checks: two, with every dynamic axis changed."""
    k = ck.size_multiple // ck.latent.downscale  # the smallest latent side the U-Net takes

    def dims(batch, seq, lh, lw):
        f = ck.latent.downscale
        return {
            "batch": batch,
            "sequence": seq,
            "latent_height": lh,
            "latent_width": lw,
            "height": lh * f,
            "width": lw * f,
            "image_sequence": (lh // 2) * (lw // 2),  # FLUX's packed latent tokens
        }

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


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Everything `export_bundle` was asked for, past the source checkpoint."""

    src: str | os.PathLike
    out: Path
    preset: str | None
    opset: int
    precision: str
    calibration: Calibration | None
    loras: tuple[Lora, ...]  # LoRA files read and checked, fused in order
    allow_pickle: bool
    tiny_vae: str | os.PathLike | None
    clip_skip: int
    description: str | None
    progress: Callable[[str, int, int], None] | None
    licence: str | None = None  # the source's licence as the user states it; else the model card's
    max_batch: int = DEFAULT_MAX_BATCH  # the largest batch each graph's axis range allows
    size_range: tuple[int, int] | None = None  # image sides in pixels; default: half to twice the native size
    phase: Phase | None = None  # the long phases within a component: calibration renders, ranges, quantization


def export_bundle(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str | None = None,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    calibration: Calibration | None = None,
    loras: Sequence[LoraSpec] = (),  # "FILE[:SCALE]" or (file, scale), fused in order
    allow_pickle: bool = False,
    description: str | None = None,  # what the model is, shown by `edgediff info`
    tiny_vae: str | os.PathLike | None = None,  # an AutoencoderTiny folder (TAESD / TAESDXL) to decode with
    clip_skip: int = 0,  # text encoder layers skipped, as diffusers' clip_skip: baked into the graph
    progress: Callable[[str, int, int], None] | None = None,  # (what was proven, steps done, steps in all)
    license: str | None = None,  # the source model's licence, where its model card does not say (or says wrong)
    max_batch: int = DEFAULT_MAX_BATCH,  # images per call the graphs' axis ranges allow
    size_range: tuple[int, int] | None = None,  # (smallest, largest) image side in pixels for the axis ranges
    phase: Phase | None = None,  # (what, done, total) within the long phases of an int8 conversion
) -> Manifest:
    """Export every component of `src`, prove each against PyTorch, and write the bundle to `out`.

    The bundle is assembled in a temporary folder beside `out` and renamed into place, so an interrupted export
    leaves nothing half-written; an existing `out` is replaced only with `force`. With `precision` fp16 or int8 the
    fp32 bundle is completed first; each converted component is then proven against its fp32 graph (int8: on
    held-out denoising trajectories, after calibrating on the others). `clip_skip` exports the text encoders so
    that they output the hidden state diffusers' `clip_skip` takes, and the manifest records it."""
    out = Path(out)
    if precision not in PRECISIONS:
        raise SourceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    # Everything that can be checked without loading a model is checked first, in the order the user wrote it.
    preflight.check_opset(opset)
    if tiny_vae is not None:
        preflight.check_tiny_vae(tiny_vae)
    preflight.check_paths(src, out)
    lora_files = [read_lora(*as_spec(a), allow_pickle=allow_pickle) for a in loras]
    options = ExportOptions(src, out, preset, opset, precision, calibration, tuple(lora_files), allow_pickle,
                            tiny_vae, clip_skip, description, progress, license, max_batch, size_range, phase)
    with preflight.export_lock(out):  # held until OUT is in place: a second export to OUT is refused
        preflight.check_replaceable(out, force)  # under the lock, so that no other export can change OUT now
        if Path(src).is_file():
            with scratch_folder(out) as folder:
                single_file_to_folder(Path(src), folder, allow_pickle)
                return _export(Checkpoint.open(folder), options)
        return _export(Checkpoint.open(src), options)


def _load_tiny_vae(folder, ck: Checkpoint):
    """The AutoencoderTiny at `folder` and the spec that exports it as this checkpoint's decoder."""
    import diffusers
    import torch

    module = diffusers.AutoencoderTiny.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return module, specs.tiny_vae_decoder_spec(module, ck.latent.scaling_factor, ck.latent.shift_factor)


def _export(ck: Checkpoint, asked: ExportOptions) -> Manifest:
    flow = ck.flow
    if flow is not None:  # what SD3 / FLUX bundles cannot do yet, before any work
        flow_families.refuse_options(flow.family, loras=asked.loras, tiny_vae=asked.tiny_vae)
    elif asked.precision == "int4":
        raise SourceError(f"--precision int4: {ck.family} has no transformer; 4-bit weights are for SD3 / FLUX "
                          "MatMuls (ONNX Runtime has no 4-bit convolution); use int8")
    encoders = ck.text_encoders(asked.clip_skip)
    plan = plan_components(encoders, flow.family if flow is not None else None)
    check_components(asked.loras, {"unet", *(e.component for e in encoders)})
    keep = kept_fp32(ck, asked.precision, asked.tiny_vae)
    total = len(plan) + len(conversion_targets(asked.precision, plan, keep, flow.t5 if flow is not None else None))

    done = 0

    def proven(what: str) -> None:
        nonlocal done
        done += 1
        if asked.progress:
            asked.progress(what, done, total)

    preset = ck.preset(asked.preset)
    family = ck.family
    scheduler, prediction_type = ck.scheduler(preset)
    if prediction_type not in PREDICTION_TYPES:
        raise SourceError(f"{ck.root}: prediction_type {prediction_type!r} in the scheduler config; edgediff runs "
                          f"{', '.join(PREDICTION_TYPES)}")
    for e in encoders:
        ck.tokenizer_files(e.tokenizer)  # present, or a SourceError before any export work
    for source in {source for name, (source, _) in plan.items() if name != "vae_decoder" or not asked.tiny_vae}:
        preflight.check_weights(ck.root / source)  # whole, or a SourceError before any export work
    if asked.tiny_vae is not None:
        preflight.check_tiny_vae(asked.tiny_vae, ck.latent.channels)
    trace_dims, gate_dims = _gate_shapes(ck)

    with atomic_folder(asked.out, replace=True) as tmp:  # export_bundle checked that OUT may be replaced
        components, component_specs = {}, {}
        for name, (source, make_spec) in plan.items():
            if name == "vae_decoder" and asked.tiny_vae is not None:
                module, spec = _load_tiny_vae(asked.tiny_vae, ck)
            else:
                module = ck.load(source, asked.allow_pickle)
                fuse(module, source, asked.loras)
                spec = make_spec(module)
            path = tmp / name / "model.onnx"
            mapped = source in LORA_COMPONENTS.values() and not (name == "vae_decoder" and asked.tiny_vae)
            written, ort_options = export_component(module, spec, trace_dims, path, opset=asked.opset,
                                                    lora_map=mapped)
            references = reference_outputs(module, spec, gate_dims)
            del module  # before the graph is loaded: both at once would not fit for a full-size SDXL U-Net
            gc.collect()
            files = tuple(FileEntry.of(tmp, str(p.relative_to(tmp))) for p in written)
            parity = check_against_torch(spec, path, references, ort_options=ort_options, files=files)
            del references
            component_specs[name] = spec  # its sample inputs feed the fp16 gate; it holds no weights
            components[name] = Component(
                file=f"{name}/model.onnx",
                precision="fp32",
                inputs=spec.inputs,
                outputs=spec.outputs,
                files=files,
                parity=parity,
                ort_options=ort_options,
                lora_map=f"{name}/{MAP_NAME}" if mapped else None,
            )
            proven(name)
        lengths = flow.tokenizer_lengths() if flow is not None else {}
        tokenizers = {e.tokenizer: _write_tokenizer(ck, e.tokenizer, tmp, lengths.get(e.tokenizer)) for e in encoders}
        defaults = ck.defaults(preset)
        sequences = _sequences(encoders, tokenizers, flow)
        components = {name: dataclasses.replace(c, axes=_axes(c, ck, defaults, sequences.get(name, sequences[""]),
                                                              asked)) for name, c in components.items()}
        manifest = Manifest(
            family=family,
            preset=preset,
            prediction_type=prediction_type,  # type: ignore[arg-type]  # checked above
            scheduler=scheduler,
            latent=ck.latent,
            size_multiple=ck.size_multiple,
            defaults=defaults,
            components=components,
            tokenizers=tokenizers,
            text_encoders=encoders,
            added_conditions=ck.added_conditions,
            guidance_embedding_dim=ck.guidance_embedding_dim,
            transformer=flow.conditions() if flow is not None else None,
            provenance=_provenance(ck, asked),
        )
        write_manifest(tmp, manifest)  # a complete fp32 bundle: what int8 calibration renders with
        if asked.precision != "fp32":
            manifest = _convert(tmp, manifest, asked.precision, ck, component_specs, gate_dims, asked.calibration,
                                proven, keep, asked.phase)
            write_manifest(tmp, manifest)
    return manifest


def _axes(c: Component, ck: Checkpoint, defaults, sequence: int, asked: ExportOptions) -> dict:
    return default_axis_ranges(c.dynamic_axes(), height=defaults.height, width=defaults.width,
                               downscale=ck.latent.downscale, size_multiple=ck.size_multiple, sequence=sequence,
                               max_batch=asked.max_batch, size_range=asked.size_range)


def _sequences(encoders, tokenizers, flow) -> dict[str, int]:
    """The text length each component's "sequence" axis takes: each encoder its tokenizer's; the denoiser (key
    "") the longest, or for SD3 CLIP's 77 tokens followed by T5's, for FLUX T5's."""
    own = {e.component: tokenizers[e.tokenizer].max_length for e in encoders}
    longest = max(own.values())
    if flow is not None:
        t5 = flow.max_sequence_length()
        clip = max(n for name, n in own.items() if name != flow.t5)
        longest = clip + t5 if flow.family == "sd3" else t5
    return {**own, "": longest}


def _write_tokenizer(ck: Checkpoint, folder: str, tmp: Path, max_length: int | None = None) -> TokenizerRecord:
    """The source's tokenizer as the bundle's canonical tokenizer.json (export/tokenizer.py), at `max_length`
    where the pipeline pads it to other than the tokenizer's own length (T5)."""
    entry = ck.index.get(folder)
    class_name = entry[1] if isinstance(entry, list) and len(entry) > 1 else None
    max_length = save_canonical_tokenizer(ck.root / folder, tmp / folder, class_name, max_length)
    return TokenizerRecord(folder, (FileEntry.of(tmp, f"{folder}/{TOKENIZER_FILE}"),), max_length)


def _provenance(ck: Checkpoint, asked: ExportOptions) -> Provenance:
    card_licence = ck.licence()
    licence, licence_from = (asked.licence, "--license") if asked.licence else (card_licence, "the model card")
    return Provenance(
        source=str(asked.src),
        description=asked.description or None,
        source_pipeline=ck.index.get("_class_name"),
        licence=licence or "unknown",
        licence_from=licence_from if licence else None,
        opset=asked.opset,
        loras=tuple(lora.provenance() for lora in asked.loras),
        vae_decoder=f"AutoencoderTiny from {asked.tiny_vae}" if asked.tiny_vae else "the checkpoint's VAE",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=_versions(),
    )


def _convert(tmp, manifest, precision, ck, component_specs, gate_dims, calibration, proven, keep,
             phase=None) -> Manifest:
    """Convert the fp32 bundle in `tmp` to `precision`, component by component, each gated against fp32."""
    import torch

    targets = conversion_targets(precision, manifest.components, keep, ck.flow.t5 if ck.flow is not None else None)
    records = {}
    provenance = dataclasses.replace(manifest.provenance, precision=precision, kept_fp32=dict(keep))
    if precision == "int8":
        calibration = calibration or Calibration()
        records = record_trajectories(tmp, tuple(targets), calibration, phase)
        provenance = dataclasses.replace(provenance, calibration=describe(calibration, records))
    components = dict(manifest.components)
    for name, target in targets.items():
        c = components[name]
        if name in records:
            calibration_feeds, gate_feeds = records.pop(name)
        else:
            spec = component_specs[name]
            calibration_feeds = None
            gate_feeds = [
                {k: v.numpy() for k, v in spec.sample(dims, torch.Generator().manual_seed(200 + i)).items()}
                for i, dims in enumerate(gate_dims)
            ]
        written, options, parity, details = convert_component(
            name, target, tmp / c.file, c.outputs, c.ort_options, c.files, gate_feeds, calibration_feeds,
            upcast_attention=bool(ck.unet_config.get("upcast_attention")) and name == "unet", phase=phase,
            lora_map=c.lora_map is not None,
        )
        for old in c.files:
            if tmp / old.path not in written:
                (tmp / old.path).unlink(missing_ok=True)
        components[name] = dataclasses.replace(
            c,
            precision=target,
            files=tuple(FileEntry.of(tmp, str(p.relative_to(tmp))) for p in written),
            parity=dataclasses.replace(parity, fp32_against_pytorch=c.parity),
            ort_options=options,
            conversion=details,
            lora_map=None if target == "int4" else c.lora_map,  # no run-time LoRA onto 4-bit weights
        )
        gc.collect()
        proven(f"{name} {target}")
    return dataclasses.replace(manifest, components=components, provenance=provenance)

