"""How much memory a render needs, estimated before any of it is allocated, and how much this machine has.

A size or an image count that cannot fit (100000x100000, a million images) should be refused with a sentence, not
attempted until the allocator or the kernel's OOM killer stops it. The estimate needs no graph inspection: what
grows with a request is the latents, the U-Net's and the VAE's activations, and both scale with batch x height x
width, except attention, which grows with the square of the token count and dominates at large sizes.

    weights      the component files' sizes (the manifest records them), for components not loaded yet
    latents      batch x channels x latent pixels x 4 bytes x LATENT_COPIES
    U-Net        per image, CFG doubled: latent tokens^2 x ATTENTION_HEADS x 4 bytes (one unscaled score matrix at
                 the first attention level) + latent pixels x UNET_BYTES_PER_LATENT_PIXEL
    VAE decoder  per image: output pixels x VAE_BYTES_PER_PIXEL + latent tokens^2 x 4 bytes (its single-head
                 mid-block attention); the VAE encoder (img2img) is counted the same. A tiled VAE (tiling.py)
                 counts one tile's pixels and tokens, plus the blended output

memory="normal" keeps every session loaded, so the stages' weights add up while only the largest stage's
activations are live at once; memory="low" loads one component per stage, so only the largest single stage counts.
The constants come from SD's architecture (below), rounded up. SD 1.5 fp32 with CFG, nothing loaded yet,
estimates 4.9 GiB at 512x512 and 20.2 GiB at 1024x1024 (tests/bad_input/test_render_inputs.py holds both under a
24 GB machine); SD-Turbo 512x512 with memory="low" estimates 3.8 GiB against a measured 3.65 GB peak RSS (4.8 GB
before low-memory sessions kept their arena, docs/loading.md), the process's own baseline included. The aim is
refusing what cannot possibly fit (a 100000x100000 render needs exabytes), not predicting a peak to the megabyte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..bundle import Manifest
from .plan import RenderError, RenderPlan

FLOAT = 4  # bytes: activations are float32 on the CPU (fp16 graphs keep fp32 islands; counting 4 overestimates)
# the sampler's working copies of the latents (x, the denoised x0, the model output, a noise draw, the CFG halves)
LATENT_COPIES = 8
# Heads at the U-Net's first attention level: SD 1.x's 8 (320 channels / 40); SD 2.x has 5 there, and SDXL's first
# attention runs at half the latent resolution (a quarter of the tokens, 10 heads), so 8 at full latent resolution
# overestimates every family edgediff renders.
ATTENTION_HEADS = 8
# The U-Net's convolution activations per latent pixel: SD's first level holds 320 channels; a ResNet block keeps
# about 8 such tensors live (input, normalised, activated, conv output, skip, the down path's saved outputs).
UNET_BYTES_PER_LATENT_PIXEL = 320 * 8 * FLOAT
# The VAE decoder's last up block runs at full resolution going from 256 to 128 channels; its ResNet keeps the
# input, the normalised and activated copies and the conv output (about 768 floats) live: 3 KiB, rounded up.
VAE_BYTES_PER_PIXEL = 4096
# SD3 / FLUX's MMDiT attends over image patches (2x2 latent pixels) and text tokens together, every block at that
# one resolution: SD3.5 Large's 38 heads (SD3.5 Medium and FLUX.1 have 24) and FLUX's 3072 channels with its 4x MLP
# (about 12 such tensors live per token) overestimate each of them.
TRANSFORMER_HEADS = 38
TRANSFORMER_BYTES_PER_TOKEN = 3072 * 12 * FLOAT
GIB = 1 << 30


@dataclass(frozen=True)
class Stage:
    component: str
    weights: int  # bytes of the component's files; what its session holds, roughly
    activations: int  # bytes its largest call allocates


def render_stages(manifest: Manifest, plan: RenderPlan, *, images: int, cfg: bool, img2img: bool,
                  vae_tile: tuple[int, int] | None = None) -> list[Stage]:
    """The stages a render runs, each with what it holds and allocates at its peak; `vae_tile`: the (height, width)
    in pixels of a tiled VAE's tiles."""
    down = manifest.latent.downscale
    tokens = (plan.height // down) * (plan.width // down)

    def weights(name: str) -> int:
        component = manifest.components.get(name)
        return sum(f.size for f in component.files) if component is not None else 0

    unet_batch = images * (2 if cfg else 1)
    denoiser = "transformer" if manifest.transformer is not None else "unet"
    if manifest.transformer is not None:
        joint = tokens // 4 + manifest.transformer.max_sequence_length + 77  # image patches, T5's and CLIP's tokens
        unet = unet_batch * (joint * joint * TRANSFORMER_HEADS * FLOAT + joint * TRANSFORMER_BYTES_PER_TOKEN)
    else:
        unet = unet_batch * (tokens * tokens * ATTENTION_HEADS * FLOAT + tokens * UNET_BYTES_PER_LATENT_PIXEL)
    vae = images * (plan.height * plan.width * VAE_BYTES_PER_PIXEL + tokens * tokens * FLOAT)
    if vae_tile is not None:
        tile_tokens = (vae_tile[0] // down) * (vae_tile[1] // down)
        tile = vae_tile[0] * vae_tile[1] * VAE_BYTES_PER_PIXEL + tile_tokens * tile_tokens * FLOAT
        vae = images * (tile + 2 * plan.height * plan.width * 3 * FLOAT)  # the blended sum and its weights
    stages = [Stage(e.component, weights(e.component), 0) for e in manifest.text_encoders]
    if img2img:
        stages.append(Stage("vae_encoder", weights("vae_encoder"), vae))
    return [*stages, Stage(denoiser, weights(denoiser), unet), Stage("vae_decoder", weights("vae_decoder"), vae)]


def bytes_needed(manifest: Manifest, plan: RenderPlan, *, images: int, cfg: bool, img2img: bool, memory: str,
                 loaded: frozenset[str] = frozenset(), vae_tile: tuple[int, int] | None = None) -> int:
    """Peak bytes the render will add: with memory="low" the largest single stage, else the weights of what is not
    loaded yet plus the largest stage's activations; the latents on top of either."""
    stages = render_stages(manifest, plan, images=images, cfg=cfg, img2img=img2img, vae_tile=vae_tile)
    lat = manifest.latent
    latents = images * LATENT_COPIES * FLOAT * lat.channels * (plan.height // lat.downscale) * (
        plan.width // lat.downscale)
    if memory == "low":
        return latents + max(s.weights + s.activations for s in stages)
    waiting = sum(s.weights for s in stages if s.component not in loaded)
    return latents + waiting + max(s.activations for s in stages)


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, and under a cgroup limit no more than the limit less the
    cgroup's usage; None where neither can be read (the check is then skipped)."""
    limits = [v for v in (_cgroup_headroom(), _meminfo_available()) if v is not None]
    return min(limits) if limits else None


def check_fits(need: int, available: int | None, what: str, memory: str) -> None:
    if available is not None and need > available:
        hint = " (or use --memory low)" if memory != "low" else ""
        raise RenderError(f"this render ({what}) needs about {_gb(need)} of memory and {_gb(available)} is "
                          f"available; render fewer or smaller images{hint}")


def _gb(n: int) -> str:
    return f"{n / GIB:,.1f} GiB" if n < 1 << 50 else f"{n / GIB:.2g} GiB"


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text().strip()) if (root / "memory.current").exists() else 0
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

