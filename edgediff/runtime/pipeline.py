"""Pipeline: tokenize -> encode -> sample -> decode, text-to-image and image-to-image, on a bundle's sessions.

Call conventions follow diffusers' StableDiffusionPipeline so that its users feel at home, and the numerics follow
it too (same weights and initial noise give the same image): CFG batches [uncond, cond], the prompt's embeddings are
repeated per image, latents are scaled by the schedule's initial noise sigma, decoding divides by the VAE's scaling
factor.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..bundle import BundleError, Manifest, load_manifest
from . import schedules
from .denoise import Conditioning, guidance_embedding, make_denoiser
from .images import decoded_to_unit, load_image, pil_to_vae_input, unit_to_pil
from .noise import make_noise
from .prompts import Embeddings, PromptEncoder, time_ids
from .samplers import SAMPLERS, SamplerInfo, resolve
from .sessions import OrtSession


MEMORY_MODES = ("normal", "low")


class RenderError(ValueError):
    """Render arguments the model cannot take; the message says what is wrong and what would do."""


@dataclass
class PipelineOutput:
    images: list | np.ndarray  # PIL images, or (N, H, W, 3) float32 in 0..1 with output_type="np"
    timings: dict[str, float | list[float]]  # seconds per stage
    warnings: list[str] = field(default_factory=list)  # truncated prompts, unknown words
    interrupted: bool = False  # a callback stopped the render early


class Timer:
    def __init__(self):
        self.timings: dict[str, float | list[float]] = {"steps": []}
        self._start = time.perf_counter()

    def stage(self, name: str, since: float) -> float:
        now = time.perf_counter()
        if name == "steps":
            self.timings["steps"].append(now - since)
        else:
            self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def total(self) -> dict:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings


def _as_list(prompt: str | list[str] | None, n: int | None = None) -> list[str]:
    if prompt is None:
        return [""] * (n or 1)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if n is not None and len(prompts) == 1 and n > 1:
        prompts = prompts * n
    if n is not None and len(prompts) != n:
        raise RenderError(f"{len(prompts)} negative prompts for {n} prompts; give one, or one per prompt")
    return prompts


class Pipeline:
    """A loaded bundle, ready to render. Use `Pipeline.load(path)`."""

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        *,
        backend: str = "cpu",
        threads: int | None = None,
        memory: str = "normal",
    ):
        if memory not in MEMORY_MODES:
            raise RenderError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}")
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.threads = threads
        self.memory = memory
        self.prompt_encoder = PromptEncoder(root, manifest)
        self.tokenizer = self.prompt_encoder.first_tokenizer
        self._sessions: dict[str, OrtSession] = {}
        if memory == "normal":
            for name in (*(e.component for e in manifest.text_encoders), "unet", "vae_decoder"):
                self.session(name)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        *,
        backend: str = "cpu",
        threads: int | None = None,
        memory: str = "normal",
        verify: bool = False,
    ) -> Pipeline:
        """Load a bundle folder, or the built-in model when `path` is None (checks every file's size and
        fingerprint; `verify` hashes them in full).

        memory="normal" keeps every session loaded; memory="low" loads each component only for its stage and
        frees it before the next, so peak memory is about the largest component instead of the sum (each render
        then pays the sessions' load time)."""
        if path is None:
            from ..models import builtin_bundle

            path = builtin_bundle()
            if path is None:
                raise BundleError("no bundle given and this install has no built-in model; pass a bundle folder")
        root = Path(path)
        return cls(root, load_manifest(root, verify=verify), backend=backend, threads=threads, memory=memory)

    def session(self, name: str) -> OrtSession:
        if name not in self._sessions:
            component = self.manifest.components.get(name)
            if component is None:
                raise RenderError(f"this bundle has no {name} (needed for this render); re-export it with one")
            if self.memory == "low":
                self._sessions.clear()  # drop the previous stage's session before this one is loaded
            self._sessions[name] = OrtSession(
                self.root, name, component, backend=self.backend, threads=self.threads, lean=self.memory == "low"
            )
        return self._sessions[name]

    # --- stages -----------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, warnings: list[str], timer: Timer
                      ) -> tuple[Embeddings, Embeddings | None]:
        """Text embeddings for the prompts (and the negatives, in the same encoder calls)."""
        emb = self.prompt_encoder(prompts + (negatives or []), self.session, warnings, timer)
        n = len(prompts)
        return emb[:n], (emb[n:] if negatives is not None else None)

    def encode_image(self, image, width: int, height: int, noise) -> np.ndarray:
        """Init image -> latents, sampled from the VAE's posterior with the render's own noise stream."""
        pixels = pil_to_vae_input(load_image(image), width, height)
        moments = self.session("vae_encoder")(sample=pixels)["latent_parameters"]
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * noise(mean.shape)
        return ((latents - self.manifest.latent.shift_factor) * self.manifest.latent.scaling_factor).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        lat = self.manifest.latent
        z = (latents / np.float32(lat.scaling_factor) + np.float32(lat.shift_factor)).astype(np.float32)
        return decoded_to_unit(self.session("vae_decoder")(latent_sample=z)["sample"])

    def resolve_sampler(self, sampler: str | None = None, schedule: str | None = None) -> tuple[SamplerInfo, str]:
        """The sampler and schedule a render runs: the caller's, else the manifest's default sampler and schedule
        (the export wrote its preset's: Turbo euler_a, trailing; LCM lcm; Lightning euler, trailing), else the
        sampler's own default. A pair that makes no sense (lcm with karras, flow_euler on an epsilon model) is
        refused."""
        sampler = sampler or self.manifest.defaults.sampler
        info, schedule = _lookup(resolve, sampler, schedule, self.manifest.defaults.schedule)
        prediction = self.manifest.prediction_type
        if (info.convention == "flow") != (prediction == "flow"):
            fits = [n for n, s in SAMPLERS.items() if (s.convention == "flow") == (prediction == "flow")]
            raise RenderError(f"sampler {sampler!r} does not fit this bundle's {prediction} model; "
                              f"choose one of {', '.join(fits)}")
        return info, schedule

    def schedule(self, sampler: str | None, steps: int, strength: float = 1.0, schedule: str | None = None,
                 *, img2img: bool = False) -> schedules.Schedule:
        """The schedule a render runs, discretised as the sampler's diffusers counterpart does. For img2img it
        starts part-way as diffusers' img2img pipelines do: LCM folds strength into its distilled timesteps and
        runs them all (LatentConsistencyModelImg2ImgPipeline), the others run the last int(steps * strength)."""
        info, name = self.resolve_sampler(sampler, schedule)
        sched = _lookup(schedules.build, self.manifest.scheduler, info.convention, name, steps,
                        strength=strength if img2img and info.convention == "lcm" else 1.0)
        if not img2img:
            return sched
        return sched.starting_at(0 if info.convention == "lcm" else schedules.img2img_start(len(sched), strength))

    # --- the render -------------------------------------------------------------------------------------------

    def _check(self, steps: int, height: int, width: int, strength: float, image) -> None:
        m = self.manifest.size_multiple
        if steps < 1:
            raise RenderError(f"steps must be at least 1, got {steps}")
        if height <= 0 or width <= 0 or height % m or width % m:
            raise RenderError(f"size {width}x{height} is not a multiple of {m} pixels, which this model needs")
        if image is not None and not 0.0 < strength <= 1.0:
            raise RenderError(f"strength must be in (0, 1], got {strength}")

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = 0,
        latents: np.ndarray | None = None,
        sampler: str | None = None,
        image=None,
        strength: float = 0.8,
        callback: Callable[[int, int, np.ndarray], bool | None] | None = None,
        output_type: str = "pil",
        noise: str = "torch",
        schedule: str | None = None,
    ) -> PipelineOutput:
        timer = Timer()
        d = self.manifest.defaults
        steps = d.steps if num_inference_steps is None else int(num_inference_steps)
        guidance = d.guidance_scale if guidance_scale is None else float(guidance_scale)
        info, schedule = self.resolve_sampler(sampler, schedule)
        rng = _lookup(make_noise, seed if seed is not None else int.from_bytes(os.urandom(4), "little"), noise)
        init_image = load_image(image) if image is not None else None
        if init_image is not None and height is None and width is None:
            m = self.manifest.size_multiple
            width, height = (init_image.width // m) * m, (init_image.height // m) * m
        height, width = height or d.height, width or d.width
        self._check(steps, height, width, strength, init_image)
        sched = self.schedule(sampler, steps, strength, schedule, img2img=init_image is not None)
        if output_type not in ("pil", "np"):
            raise RenderError(f"output_type must be 'pil' or 'np', got {output_type!r}")

        prompts = _as_list(prompt)
        embedding_dim = self.manifest.guidance_embedding_dim
        cfg = guidance > 1.0 and not embedding_dim
        added = self.manifest.added_conditions
        # SDXL: no negative prompt at all (not an empty one) means zero negative embeddings, as in diffusers
        zero_negatives = cfg and negative_prompt is None and added is not None and added.force_zeros_for_empty_prompt
        negatives = _as_list(negative_prompt, len(prompts)) if cfg and not zero_negatives else None
        warnings: list[str] = []
        cond, uncond = self.encode_prompt(prompts, negatives, warnings, timer)
        if zero_negatives:
            uncond = cond.zeros_like()
        t = time.perf_counter()
        cond = cond.repeat(num_images_per_prompt)
        uncond = uncond.repeat(num_images_per_prompt) if uncond is not None else None
        batch = cond.hidden.shape[0]
        timestep_cond = (
            guidance_embedding(np.full(batch, guidance - 1.0, np.float32), embedding_dim) if embedding_dim else None
        )
        extra, extra_uncond = {}, {}
        if added is not None:
            ids = time_ids(height, width, added.crops_coords_top_left, batch)
            extra = {"text_embeds": cond.pooled, "time_ids": ids}
            extra_uncond = {"text_embeds": uncond.pooled, "time_ids": ids} if uncond is not None else {}
        conditioning = Conditioning(cond.hidden, uncond.hidden if uncond is not None else None, guidance,
                                    timestep_cond, extra, extra_uncond)

        lat = self.manifest.latent
        shape = (batch, lat.channels, height // lat.downscale, width // lat.downscale)
        if init_image is not None:
            clean = self.encode_image(init_image, width, height, rng.randn)
            clean = np.repeat(clean, batch // clean.shape[0], axis=0)
            t = timer.stage("vae_encoder", t)
            x = clean + _initial_noise(latents, shape, rng) * np.float32(sched.init_noise_sigma)
        else:
            x = _initial_noise(latents, shape, rng) * np.float32(sched.init_noise_sigma)

        denoise = make_denoiser(
            self.session("unet"),
            conditioning,
            self.manifest.prediction_type,
            sched.timestep_for,
            lcm_timestep_scaling=self.manifest.scheduler.timestep_scaling if info.convention == "lcm" else None,
        )
        total = len(sched)
        interrupted = False

        def on_step(i, x_now, x0):
            nonlocal t, interrupted
            t = timer.stage("steps", t)
            # the sampler's x is its working buffer, updated in place next step: the caller gets its own copy
            if callback is not None and callback(i, total, x_now.copy()) is False:
                interrupted = True
                return False
            return None

        extra = {"targets": sched.targets} if sched.targets is not None else {}
        x = info.fn(denoise, x.astype(np.float32), sched.sigmas, noise=rng.randn, callback=on_step, **extra)
        if not interrupted and sched.final_scale != 1.0:
            x = x * np.float32(sched.final_scale)  # DDIM / TCD stop short of sigma 0, in alpha space
        del denoise  # with memory="low" the U-Net session must be freed before the VAE decoder's is loaded
        t = time.perf_counter()
        images = self.decode(x)
        timer.stage("vae_decoder", t)
        out = images if output_type == "np" else unit_to_pil(images)
        return PipelineOutput(out, timer.total(), warnings, interrupted)


def _initial_noise(latents: np.ndarray | None, shape: tuple[int, ...], rng) -> np.ndarray:
    if latents is None:
        return rng.randn(shape)
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise RenderError(f"latents have shape {latents.shape}; this render needs {shape}")
    return latents


def _lookup(getter, *args, **kwargs):
    """The library's ValueError about a bad name or pair, as a RenderError (one line, exit code 2 at the CLI)."""
    try:
        return getter(*args, **kwargs)
    except ValueError as e:
        raise RenderError(str(e)) from None
