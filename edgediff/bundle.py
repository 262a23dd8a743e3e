"""The bundle manifest: the one contract between export and runtime.

A bundle is a folder laid out as Optimum's ONNX exporter lays it out (`text_encoder/model.onnx`, `unet/model.onnx`,
`vae_decoder/model.onnx`, `tokenizer/`) plus `manifest.json`, which says everything the runtime needs. The runtime
trusts the manifest and nothing else: no guessing from file names.

This module is shared by both stages, so it imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "edgediff-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_CHUNK = 4096
_HASH_BLOCK = 1 << 22


class BundleError(Exception):
    """A bundle that cannot be used; the message is one line saying what is wrong and what to do."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle, with what it takes to check it quickly (size, fingerprint) and fully (sha256)."""

    path: str
    size: int
    sha256: str
    fingerprint: str

    @classmethod
    def of(cls, root: Path, rel: str) -> FileEntry:
        full = root / rel
        return cls(rel, full.stat().st_size, sha256_file(full), fingerprint_file(full))


@dataclass(frozen=True)
class Component:
    """One exported model: its graph file (and external data), precision and I/O signature."""

    file: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[FileEntry, ...]
    parity: dict[str, Any] = field(default_factory=dict)
    # How ONNX Runtime should run this graph, chosen at export: {"graph_optimization_level": "all" | "extended" |
    # "basic" | "disabled", "disable_prepacking": bool}. See docs/loading.md for why these differ per component.
    ort_options: dict[str, Any] = field(default_factory=dict)
    # What a reduced-precision conversion did: fp16's fp32 islands; int8's scheme, layer counts and the file of its
    # per-layer report (quantized vs float, with reasons), which is also listed in `files`.
    conversion: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> Component:
        return cls(
            file=d["file"],
            precision=d["precision"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            files=tuple(FileEntry(**f) for f in d["files"]),
            parity=dict(d.get("parity", {})),
            ort_options=dict(d.get("ort_options", {})),
            conversion=dict(d.get("conversion", {})),
        )

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule, as the checkpoint's scheduler config states it."""

    num_train_timesteps: int = 1000
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
    source_class: str = ""
    # Sampler name -> the fields whose value differs under that sampler's diffusers class: a key the source config
    # lacks takes each class's own default (DDIMScheduler: set_alpha_to_one and clip_sample true, EulerDiscrete:
    # neither), and a render must match `ThatClass.from_config(source_config)`.
    per_sampler: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> SchedulerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("trained_betas") is not None:
            d["trained_betas"] = tuple(d["trained_betas"])
        return cls(**d)

    def for_sampler(self, name: str) -> SchedulerConfig:
        """The training schedule as the sampler's diffusers class reads the source config."""
        changes = self.per_sampler.get(name)
        return dataclasses.replace(self, **changes, per_sampler={}) if changes else self


@dataclass(frozen=True)
class LatentSpace:
    channels: int = 4
    downscale: int = 8
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0


@dataclass(frozen=True)
class Defaults:
    sampler: str = "euler"
    steps: int = 20
    guidance_scale: float = 7.5
    height: int = 512
    width: int = 512


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder's part in the U-Net's conditioning. The graph already outputs the hidden state the U-Net
    needs (`layer`, an index into the encoder's hidden states, through the final layer norm or not, as the source
    pipeline takes it); `layer` and `final_layer_norm` record which, the runtime reads only `output`."""

    component: str = "text_encoder"
    tokenizer: str = "tokenizer"  # the bundle folder of its tokenizer, also listed in Manifest.tokenizers
    output: str = "last_hidden_state"
    layer: int = -1  # hidden_states[layer]; -1 with the final norm is last_hidden_state
    final_layer_norm: bool = True
    clip_skip: int = 0  # the layers skipped beyond what the family takes (diffusers' clip_skip)
    pooled_output: str | None = None  # the pooled embedding the U-Net takes as `text_embeds` (SDXL: encoder 2)

    @classmethod
    def from_json(cls, d: dict) -> TextEncoder:
        return cls(**d)


@dataclass(frozen=True)
class AddedConditions:
    """SDXL's micro-conditioning: the U-Net's `text_embeds` (pooled) and `time_ids` (original size, crop top-left,
    target size). Sizes default to the render's (height, width), as diffusers' StableDiffusionXLPipeline does."""

    crops_coords_top_left: tuple[int, int] = (0, 0)
    # An absent negative prompt gives all-zero negative embeddings (pooled included) instead of encoding "".
    force_zeros_for_empty_prompt: bool = True

    @classmethod
    def from_json(cls, d: dict) -> AddedConditions:
        return cls(tuple(d.get("crops_coords_top_left", (0, 0))), bool(d.get("force_zeros_for_empty_prompt", True)))


@dataclass(frozen=True)
class Manifest:
    family: str  # "sd1", "sd2", "sdxl", ...
    preset: str  # "standard", "turbo", "lcm", "lightning"
    prediction_type: str  # "epsilon", "v_prediction", "sample"
    scheduler: SchedulerConfig
    latent: LatentSpace
    size_multiple: int  # image sides must be multiples of this (VAE downscale x U-Net downsampling)
    defaults: Defaults
    components: dict[str, Component]
    tokenizer: dict[str, Any]  # {"path": "tokenizer", "files": [FileEntry...], "max_length": 77}
    guidance_embedding_dim: int | None = None  # LCM: the U-Net takes w as a sinusoidal embedding instead of CFG
    provenance: dict[str, Any] = field(default_factory=dict)
    # In order; their hidden states are concatenated on the feature axis (SDXL: CLIP-L then OpenCLIP-bigG).
    text_encoders: tuple[TextEncoder, ...] = (TextEncoder(),)
    tokenizer_2: dict[str, Any] | None = None  # a second encoder's tokenizer, as `tokenizer`
    added_conditions: AddedConditions | None = None  # SDXL only

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        tok, tok2 = _tokenizer_from_json(d["tokenizer"]), d.get("tokenizer_2")
        encoders, added = d.get("text_encoders"), d.get("added_conditions")
        return cls(
            family=d["family"],
            preset=d["preset"],
            prediction_type=d["prediction_type"],
            scheduler=SchedulerConfig.from_json(d["scheduler"]),
            latent=LatentSpace(**d["latent"]),
            size_multiple=int(d["size_multiple"]),
            defaults=Defaults(**d["defaults"]),
            components={k: Component.from_json(v) for k, v in d["components"].items()},
            tokenizer=tok,
            guidance_embedding_dim=d.get("guidance_embedding_dim"),
            provenance=dict(d.get("provenance", {})),
            text_encoders=tuple(TextEncoder.from_json(e) for e in encoders) if encoders else (TextEncoder(),),
            tokenizer_2=_tokenizer_from_json(tok2) if tok2 else None,
            added_conditions=AddedConditions.from_json(added) if added else None,
        )

    def tokenizer_entry(self, path: str) -> dict[str, Any]:
        """The tokenizer record whose folder is `path`."""
        for tok in (self.tokenizer, self.tokenizer_2):
            if tok is not None and tok["path"] == path:
                return tok
        raise KeyError(f"no tokenizer {path!r} in the manifest")

    def all_files(self) -> list[FileEntry]:
        files = [f for c in self.components.values() for f in c.files]
        for tok in (self.tokenizer, self.tokenizer_2):
            files += list(tok.get("files", ())) if tok else []
        return files


def _tokenizer_from_json(d: dict) -> dict[str, Any]:
    return {**d, "files": tuple(FileEntry(**f) for f in d.get("files", ()))}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: Path) -> str:
    """A cheap stand-in for the full hash: the size and 16 chunks spread over the file, head and tail included.

    Hashing a 5 GB bundle at every load would cost seconds; this reads 64 KiB and still catches truncation,
    swapped files and most corruption. `edgediff info --verify` does the full sha256.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        span = max(size - _FINGERPRINT_CHUNK, 0)
        for i in range(_FINGERPRINT_SAMPLES):
            f.seek(span * i // (_FINGERPRINT_SAMPLES - 1))
            h.update(f.read(_FINGERPRINT_CHUNK))
    return h.hexdigest()


def write_manifest(root: Path, manifest: Manifest) -> None:
    (Path(root) / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")


def read_manifest(root: str | os.PathLike) -> Manifest:
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
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: manifest format version {version!r}, this edgediff reads version {FORMAT_VERSION}; "
            "re-export the bundle with this edgediff version"
        )
    try:
        return Manifest.from_json(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-export the bundle") from None


def check_files(root: str | os.PathLike, manifest: Manifest, *, full: bool = False) -> None:
    """Check every file the manifest lists: present, right size, right fingerprint (or full sha256 when `full`)."""
    root = Path(root)
    for entry in manifest.all_files():
        path = root / entry.path
        if not path.is_file():
            raise BundleError(f"{path}: missing bundle file; re-export the bundle")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(
                f"{path}: {size} bytes, the manifest says {entry.size} (truncated or replaced); re-export the bundle"
            )
        if full:
            if sha256_file(path) != entry.sha256:
                raise BundleError(f"{path}: sha256 differs from the manifest (corrupt); re-export the bundle")
        elif fingerprint_file(path) != entry.fingerprint:
            raise BundleError(f"{path}: contents differ from the manifest (corrupt); re-export the bundle")


def load_manifest(root: str | os.PathLike, *, verify: bool = False) -> Manifest:
    """Read the manifest and check the files it lists; the runtime's single entry point into a bundle."""
    manifest = read_manifest(root)
    check_files(root, manifest, full=verify)
    return manifest
