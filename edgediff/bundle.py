"""The bundle manifest: the one contract between export and runtime.

A bundle is a folder laid out as Optimum's ONNX exporter lays it out (`text_encoder/model.onnx`, `unet/model.onnx`,
`vae_decoder/model.onnx`, `tokenizer/`) plus `manifest.json`, which says everything the runtime needs. The runtime
trusts the manifest and nothing else: no guessing from file names.

This module is shared by both stages, so it imports only the standard library.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .bundle_files import check_confined, check_files
from .records import (
    BUNDLE_PATH,
    NONEMPTY,
    NOT_WRITTEN,
    OPTIMIZATION_LEVELS,
    PREDICTION_TYPES,
    UNKNOWN_LICENCE,
    AxisRange,
    BundleError,
    CalibrationRecord,
    Conversion,
    FieldError,
    FileEntry,
    LoraRecord,
    Parity,
    PredictionType,
    Provenance,
    SessionOptions,
    TensorSpec,
    TokenizerRecord,
    at_least,
    read_record,
    to_json,
)

# The records bundle.py's users take from here, wherever they are defined.
__all__ = [
    "OPTIMIZATION_LEVELS",
    "PREDICTION_TYPES",
    "UNKNOWN_LICENCE",
    "AddedConditions",
    "AxisRange",
    "BundleError",
    "CalibrationRecord",
    "Component",
    "Conversion",
    "Defaults",
    "FieldError",
    "FileEntry",
    "LatentSpace",
    "LoraRecord",
    "Manifest",
    "Parity",
    "Provenance",
    "SchedulerConfig",
    "SessionOptions",
    "TensorSpec",
    "TextEncoder",
    "TokenizerRecord",
    "TransformerConditions",
    "Verify",
    "check_confined",
    "check_files",
    "default_axis_ranges",
    "load_manifest",
    "read_manifest",
    "write_manifest",
]

FORMAT = "edgediff-bundle"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


# Batch sizes a graph is built for by default. A CFG render feeds the U-Net twice the images; doubling the U-Net's
# batch range for that is the TensorRT build's business, the manifest states images per call as exported.
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class Component:
    """One exported model: its graph file (and external data), precision, I/O signature and the sizes each of its
    dynamic axes takes."""

    file: str = field(metadata=BUNDLE_PATH)
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...] = field(metadata=NONEMPTY)
    axes: dict[str, AxisRange] = field(default_factory=dict)  # every dynamic axis name of inputs and outputs
    parity: Parity | None = None
    ort_options: SessionOptions = field(default_factory=SessionOptions)
    conversion: Conversion | None = None
    # Run-time LoRA: where each source layer's weight lies in the graph (lora_format.LoraMap), one of `files`.
    lora_map: str | None = field(default=None, metadata=BUNDLE_PATH)

    def dynamic_axes(self) -> list[str]:
        names = (d for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str))
        return list(dict.fromkeys(names))


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule, as the checkpoint's scheduler config states it."""

    num_train_timesteps: int = field(default=1000, metadata=at_least(1))
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50  # LCM: the teacher's schedule that distilled timesteps are drawn from
    timestep_scaling: float = 10.0  # LCM: boundary-condition scaling of the timestep
    set_alpha_to_one: bool = False  # DDIM: whether the last step lands on sigma 0 or on sigma(t=0)
    clip_sample: bool = False  # DDIM, Heun, LCM: clamp the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    # Flow matching (FlowMatchEulerDiscreteScheduler): SD3's static shift, FLUX's resolution-dependent one (mu
    # linear in the image token count between the two lengths, from base_shift to max_shift)
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = field(default=256, metadata=at_least(1))
    max_image_seq_len: int = field(default=4096, metadata=at_least(1))
    source_class: str = ""
    # Sampler name -> the fields whose value differs under that sampler's diffusers class: a key the source config
    # lacks takes each class's own default (DDIMScheduler: set_alpha_to_one and clip_sample true, EulerDiscrete:
    # neither), and a render must match `ThatClass.from_config(source_config)`.
    per_sampler: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_sampler(self, name: str) -> SchedulerConfig:
        """The training schedule as the sampler's diffusers class reads the source config."""
        changes = self.per_sampler.get(name)
        return replace(self, **changes, per_sampler={}) if changes else self


@dataclass(frozen=True)
class LatentSpace:
    channels: int = field(default=4, metadata=at_least(1))
    downscale: int = field(default=8, metadata=at_least(1))
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0


@dataclass(frozen=True)
class Defaults:
    """What a render runs when the caller does not say: written at export from the preset."""

    sampler: str
    schedule: str
    steps: int = field(metadata=at_least(1))
    guidance_scale: float
    height: int = field(metadata=at_least(1))
    width: int = field(metadata=at_least(1))


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder's part in the U-Net's conditioning. The graph already outputs the hidden state the U-Net
    needs (`layer`, an index into the encoder's hidden states, through the final layer norm or not, as the source
    pipeline takes it); `layer` and `final_layer_norm` record which, the runtime reads only `output`."""

    component: str = "text_encoder"
    tokenizer: str = "tokenizer"  # its key in Manifest.tokenizers (the bundle folder's name)
    output: str = "last_hidden_state"
    layer: int = -1  # hidden_states[layer]; -1 with the final norm is last_hidden_state
    final_layer_norm: bool = True
    clip_skip: int = 0  # the layers skipped beyond what the family takes (diffusers' clip_skip)
    pooled_output: str | None = None  # the pooled embedding the U-Net takes as `text_embeds` (SDXL: encoder 2)


@dataclass(frozen=True)
class AddedConditions:
    """SDXL's micro-conditioning: the U-Net's `text_embeds` (pooled) and `time_ids` (original size, crop top-left,
    target size). Sizes default to the render's (height, width), as diffusers' StableDiffusionXLPipeline does."""

    crops_coords_top_left: tuple[int, int] = (0, 0)
    # An absent negative prompt gives all-zero negative embeddings (pooled included) instead of encoding "".
    force_zeros_for_empty_prompt: bool = True


@dataclass(frozen=True)
class TransformerConditions:
    """SD3 / FLUX: what the MMDiT transformer is fed beyond the text encoders' outputs (runtime/families/sd3.py,
    flux.py)."""

    max_sequence_length: int = field(metadata=at_least(1))  # T5's tokens (SD3 without T5: zeros of this length)
    joint_attention_dim: int = field(metadata=at_least(1))  # width of the transformer's text tokens (T5's)
    guidance_embeds: bool = False  # FLUX.1-dev: guidance is a model input (distilled), not a CFG batch
    max_side: int | None = field(default=None, metadata=at_least(1))  # pixels; SD3's position embedding's reach


@dataclass(frozen=True)
class Manifest:
    family: str  # "sd1", "sd2", "sdxl", ...
    preset: str  # "standard", "turbo", "lcm", "lightning"
    prediction_type: PredictionType
    scheduler: SchedulerConfig
    latent: LatentSpace
    size_multiple: int = field(metadata=at_least(1))  # image sides: multiples of VAE downscale x U-Net downsampling
    defaults: Defaults
    components: dict[str, Component] = field(metadata=NONEMPTY)
    tokenizers: dict[str, TokenizerRecord] = field(metadata=NONEMPTY)  # by role: "tokenizer", "tokenizer_2"
    guidance_embedding_dim: int | None = None  # LCM: the U-Net takes w as a sinusoidal embedding instead of CFG
    provenance: Provenance = field(default_factory=Provenance)
    # In order; their hidden states are concatenated on the feature axis (SDXL: CLIP-L then OpenCLIP-bigG).
    text_encoders: tuple[TextEncoder, ...] = field(default=(TextEncoder(),), metadata=NONEMPTY)
    added_conditions: AddedConditions | None = None  # SDXL only
    transformer: TransformerConditions | None = None  # SD3 and FLUX only
    # The format version read from disk when it was older (migrate.py); its tokenizers are converted in memory.
    migrated_from: int | None = field(default=None, metadata=NOT_WRITTEN)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **to_json(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """The manifest in `d` (current format), every field checked; FieldError names the first bad one."""
        manifest: Manifest = read_record(cls, {k: v for k, v in d.items() if k not in ("format", "format_version")}, "")
        check_references(manifest)
        return manifest

    def all_files(self) -> list[FileEntry]:
        files = [f for c in self.components.values() for f in c.files]
        return files + [f for t in self.tokenizers.values() for f in t.files]

    def all_paths(self) -> list[str]:
        """Every path the runtime opens: graphs, listed files, tokenizer folders, conversion reports."""
        paths = [c.file for c in self.components.values()] + [t.path for t in self.tokenizers.values()]
        reports = [c.conversion.report for c in self.components.values() if c.conversion and c.conversion.report]
        return list(dict.fromkeys(paths + reports + [f.path for f in self.all_files()]))


def check_numbers(m: Manifest) -> None:
    """Numbers the render computes with: finite, and noise-schedule betas that are probabilities."""
    s = m.scheduler
    for where, value in (("scheduler.beta_start", s.beta_start), ("scheduler.beta_end", s.beta_end),
                         ("scheduler.timestep_scaling", s.timestep_scaling),
                         ("scheduler.clip_sample_range", s.clip_sample_range),
                         ("latent.scaling_factor", m.latent.scaling_factor),
                         ("latent.shift_factor", m.latent.shift_factor),
                         ("defaults.guidance_scale", m.defaults.guidance_scale), ("scheduler.shift", s.shift),
                         ("scheduler.base_shift", s.base_shift), ("scheduler.max_shift", s.max_shift)):
        if not math.isfinite(value):
            raise FieldError(where, f"{value!r} is not a finite number")
    if s.shift <= 0:
        raise FieldError("scheduler.shift", f"{s.shift!r} is not positive (flow sigmas are scaled by it)")
    if s.base_image_seq_len >= s.max_image_seq_len:
        raise FieldError("scheduler", f"base_image_seq_len {s.base_image_seq_len} is not below max_image_seq_len "
                         f"{s.max_image_seq_len} (FLUX's shift is interpolated between them)")
    if not 0 < s.beta_start <= s.beta_end < 1:
        raise FieldError("scheduler", f"beta_start {s.beta_start} and beta_end {s.beta_end} are not "
                         "0 < start <= end < 1")
    if s.trained_betas is not None and not all(0 < b < 1 for b in s.trained_betas):
        raise FieldError("scheduler.trained_betas", "each must be between 0 and 1")
    if m.latent.scaling_factor == 0:
        raise FieldError("latent.scaling_factor", "0 (latents are divided by it)")


def check_references(m: Manifest) -> None:
    """What types cannot say: names that must point at something, and ranges that must be ordered."""
    check_numbers(m)
    for i, e in enumerate(m.text_encoders):
        if e.component not in m.components:
            raise FieldError(f"text_encoders[{i}].component", f"no component {e.component!r}")
        if e.tokenizer not in m.tokenizers:
            raise FieldError(f"text_encoders[{i}].tokenizer", f"no tokenizer {e.tokenizer!r}")
    for name, c in m.components.items():
        for what, path in (("file", c.file), ("lora_map", c.lora_map)):
            if path is not None and path not in {f.path for f in c.files}:
                raise FieldError(f"components.{name}.{what}", f"{path!r} is not among the component's files")
        for axis in c.dynamic_axes():
            r = c.axes.get(axis)
            if r is None:
                raise FieldError(f"components.{name}.axes", f"no range for dynamic axis {axis!r}")
            if not r.min <= r.opt <= r.max:
                raise FieldError(f"components.{name}.axes.{axis}",
                                 f"min {r.min}, opt {r.opt}, max {r.max} not in order")


def default_axis_ranges(
    axes: list[str],
    *,
    height: int,
    width: int,
    downscale: int,
    size_multiple: int,
    sequence: int,
    max_batch: int = DEFAULT_MAX_BATCH,
    size_range: tuple[int, int] | None = None,
) -> dict[str, AxisRange]:
    """Ranges for the named dynamic axes: images from half to twice the native size (or `size_range`, in pixels),
    rounded to the size multiple; text at the tokenizer's length (the runtime always pads to it); 1..max_batch."""

    def pixels(native: int) -> AxisRange:
        low, high = size_range or (native // 2, native * 2)
        low = max(size_multiple, low // size_multiple * size_multiple)
        high = max(low, -(-high // size_multiple) * size_multiple)
        return AxisRange(low, min(max(native, low), high), high)

    sides = {"height": pixels(height), "width": pixels(width)}
    known = {
        "batch": AxisRange(1, 1, max_batch),
        "sequence": AxisRange(sequence, sequence, sequence),
        **sides,
        **{f"latent_{k}": AxisRange(*(getattr(r, a) // downscale for a in ("min", "opt", "max")))
           for k, r in sides.items()},
        # FLUX's packed image tokens: one per 2x2 latent patch
        "image_sequence": AxisRange(*(getattr(sides["height"], a) // (2 * downscale)
                                      * (getattr(sides["width"], a) // (2 * downscale))
                                      for a in ("min", "opt", "max"))),
    }
    unknown = [a for a in axes if a not in known]
    if unknown:
        raise ValueError(f"no default range for dynamic axes {unknown}; known: {', '.join(known)}")
    return {a: known[a] for a in axes}


def write_manifest(root: Path, manifest: Manifest) -> None:
    (Path(root) / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def read_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Read and validate a bundle's manifest; BundleError (one line) if the bundle cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle folder; export one with `edgediff export SRC {root}`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root}: not an edgediff bundle (no {MANIFEST_NAME}); export one with `edgediff export`")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e}); re-export the bundle") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path}: not an edgediff manifest; re-export the bundle")
    version = raw.get("format_version")
    try:
        if version == 1:
            from .migrate import (
                migrate_v1,  # older bundles load as they are: migrated in memory, never rewritten
            )

            return migrate_v1(raw, root)
        if version == FORMAT_VERSION:
            return Manifest.from_json(raw)
    except FieldError as e:
        raise BundleError(f"{path}: {e}; re-export the bundle") from None
    raise BundleError(
        f"{path}: manifest format version {version!r}, this edgediff reads versions 1 to {FORMAT_VERSION}; "
        "re-export the bundle with this edgediff version, or update edgediff"
    )


Verify = bool | Literal["fast", "full"]


def load_manifest(root: str | os.PathLike[str], *, verify: Verify = "fast", allow_symlinks: bool = False) -> Manifest:
    """Read the manifest and check the files it lists; the runtime's single entry point into a bundle.

    verify="fast" (or False) checks each file's size and a 16-chunk fingerprint; "full" (or True) hashes every
    byte, for when corruption between the fingerprint's samples must be caught too."""
    if verify not in (False, True, "fast", "full"):
        raise ValueError(f"verify must be 'fast' or 'full', got {verify!r}")
    manifest = read_manifest(root)
    check_confined(root, manifest, allow_symlinks=allow_symlinks)
    check_files(root, manifest, full=verify in (True, "full"))
    return manifest
