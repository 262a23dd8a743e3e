"""Pipeline: plan -> conditioning -> initial latents -> loop -> decode, on a bundle's sessions.

Call conventions follow diffusers' StableDiffusionPipeline so that its users feel at home, and the numerics follow
it too (same weights and initial noise give the same image): latents are scaled by the schedule's initial noise
sigma, decoding divides by the VAE's scaling factor. What differs per model family (encoders, conditioning, latent
layout, the model's call) is in runtime/families/; the loop below knows none of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..bundle import BundleError, Component, Manifest, Verify, load_manifest
from ..lora_format import LoraSpec
from . import memory as memory_estimate
from .backends import check_takes_initializers, open_session
from .denoise import make_denoiser
from .families import Conditioning, family_for, latent_shape
from .images import ImageSource, decoded_to_unit, load_image, pil_to_vae_input, unit_to_pil
from .lora import LoraState, LoraSwitch
from .noise import BatchNoise, NoiseSource, make_noise
from .plan import (
    OUTPUT_TYPES,
    RenderError,
    RenderPlan,
    build_schedule,
    checked_strength,
    checked_threads,
    make_plan,
    sampler_settings,
)
from .sampler_catalogue import SAMPLERS
from .samplers import Noise
from .schedules import Schedule
from .sessions import Session, SessionSettings
from .tiling import VAE_TILING, choose_tile, vae_pass
from .timing import StageTimer

MEMORY_MODES = ("normal", "low")
# (component name, its manifest record) -> a session; the default opens it through the backend registry
SessionFactory = Callable[[str, Component], Session]
# (step, steps, latents) -> False to stop the render
StepCallback = Callable[[int, int, np.ndarray], "bool | None"]

__all__ = ["MEMORY_MODES", "VAE_TILING", "LoraSpec", "LoraSwitch", "Pipeline", "PipelineOutput", "RenderError",
           "RenderPlan", "SessionFactory"]


@dataclass
class PipelineOutput:
    images: list[Image.Image] | np.ndarray  # PIL images, or (N, H, W, 3) float32 in 0..1 with output_type="np"
    timings: dict[str, float | list[float]]  # seconds per stage
    warnings: list[str] = field(default_factory=list)  # truncated prompts, unknown words
    interrupted: bool = False  # a callback stopped the render early
    plan: RenderPlan | None = None  # what the render resolved: sampler, schedule, steps, guidance, size, seed, ...




class Pipeline:
    """A loaded bundle, ready to render. Use `Pipeline.load(path)`."""

    def __init__(self, root: Path, manifest: Manifest, *, backend: str = "cpu", threads: int | None = None,
                 memory: str = "normal", session_factory: SessionFactory | None = None,
                 vae_tiling: str = "auto", loras: Sequence[LoraSpec] = ()) -> None:
        """`session_factory(name, component)` opens each component's session; by default the registry's
        `backend` does, with `threads`, the memory mode's settings and the weights `loras` change (set_loras)."""
        if memory not in MEMORY_MODES:
            raise RenderError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}")
        if vae_tiling not in VAE_TILING:
            raise RenderError(f"unknown VAE tiling {vae_tiling!r}; choose one of {', '.join(VAE_TILING)}")
        self.vae_tiling = vae_tiling
        threads = checked_threads(threads)
        self.root = root
        self.manifest = manifest
        self.backend = backend
        self.memory = memory
        settings = SessionSettings(threads=threads, lean=memory == "low")
        self._loras = LoraState(root, manifest)
        self._custom_sessions = session_factory is not None
        self._open = session_factory or (lambda name, c: open_session(
            root, name, c, backend, replace(settings, initializers=self._loras.weights.get(name, {}))))
        self.family = family_for(root, manifest)
        self._sessions: dict[str, Session] = {}
        self.lora_switch: LoraSwitch | None = None  # what the last set_loras did, and how long it took
        if loras:
            self.set_loras(loras)
        if memory == "normal":
            for name in (*(e.component for e in manifest.text_encoders), self.family.denoiser, "vae_decoder"):
                self.session(name)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, backend: str = "cpu", threads: int | None = None,
             memory: str = "normal", verify: Verify = "fast", allow_symlinks: bool = False,
             session_factory: SessionFactory | None = None, vae_tiling: str = "auto",
             loras: Sequence[LoraSpec] = ()) -> Pipeline:
        """Load a bundle folder, or the built-in model when `path` is None (checks every file's size and
        fingerprint; verify="full" hashes them in full). Every file must lie inside the folder: symbolic links out
        of it (a hub cache's layout) are refused unless `allow_symlinks`.

        memory="normal" keeps every session loaded; memory="low" loads each component only for its stage and
        frees it before the next, so peak memory is about the largest component instead of the sum (each render
        then pays the sessions' load time). `loras`: see set_loras.

        vae_tiling="on" decodes (and encodes) images larger than the model's native size in overlapping tiles, so
        that the VAE's activation memory is one tile's; "auto" does so from 4x the native pixel count (and 1024²),
        or where the whole-image decode would not fit the memory available; "off" never (runtime/tiling.py)."""
        if path is None:
            from ..models import builtin_bundle

            path = builtin_bundle()
            if path is None:
                raise BundleError("no bundle given and this install has no built-in model; pass a bundle folder")
        root = Path(path)
        manifest = load_manifest(root, verify=verify, allow_symlinks=allow_symlinks)
        return cls(root, manifest, backend=backend, threads=threads, memory=memory, session_factory=session_factory,
                   vae_tiling=vae_tiling, loras=loras)

    def session(self, name: str) -> Session:
        if name not in self._sessions:
            component = self.manifest.components.get(name)
            if component is None:
                raise RenderError(f"this bundle has no {name} (needed for this render); re-export it with one")
            if self.memory == "low":  # free the previous stage's session before this one is loaded
                for session in self._sessions.values():
                    session.close()
                self._sessions.clear()
            self._sessions[name] = self._open(name, component)
        return self._sessions[name]

    def set_loras(self, loras: Sequence[LoraSpec]) -> LoraSwitch:
        """Run with `loras` from now on, instead of the LoRAs before: ("file.safetensors", scale) pairs,
        "FILE[:SCALE]" strings or paths (scale 1), diffusers or kohya keys, added in NumPy to the weights the
        bundle's LoRA maps locate and handed to the sessions at creation; the bundle's files are not touched.
        Only the sessions whose weights change are rebuilt. `[]` goes back to the bundle's own weights.

        Everything is read and checked first: a LoRA this bundle cannot take (another architecture, keys that
        match nothing, a bundle exported without LoRA maps, a backend that runs fixed engines) raises LoraError or
        BackendError, one line, and the pipeline stays as it was. Returns what changed and how long it took."""
        start = time.perf_counter()
        if loras and self._custom_sessions:
            raise RenderError("run-time LoRAs need the backend registry's sessions; load without session_factory")
        if loras:
            check_takes_initializers(self.backend)
        new = self._loras.prepare(loras)
        previous = self._loras.current
        self._close(new.changed)  # the old sessions and weights go before the new ones are made
        try:
            self._loras.apply(new)
            weights_done = time.perf_counter()
            self._open_now(new.changed)
        except BaseException:
            self._close(new.changed)
            self._loras.apply(replace(previous, changed=new.changed))
            self._open_now(new.changed)
            raise
        self.lora_switch = self._loras.switch(new, weights_done - start, time.perf_counter() - start)
        return self.lora_switch

    def _close(self, names: Sequence[str]) -> None:
        for name in names:
            session = self._sessions.pop(name, None)
            if session is not None:
                session.close()

    def _open_now(self, names: Sequence[str]) -> None:
        if self.memory == "normal":
            for name in names:
                self.session(name)

    def plan(self, *, image: Image.Image | None = None, **choices: Any) -> RenderPlan:
        """The render `__call__` would run with these arguments (`make_plan`'s), resolved and checked; with an
        init image and no size, the image's own size rounded down to what the model takes."""
        if image is not None and choices.get("height") is None and choices.get("width") is None:
            m = self.manifest.size_multiple
            choices.update(width=(image.width // m) * m, height=(image.height // m) * m)
        return make_plan(self.manifest, **choices)

    # --- the render -------------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | Sequence[int] | None = 0,
        latents: np.ndarray | None = None,
        sampler: str | None = None,
        image: ImageSource | None = None,
        strength: float = 0.8,
        callback: StepCallback | None = None,
        output_type: str = "pil",
        noise: str = "torch",
        schedule: str | None = None,
        eta: float | None = None,
        true_cfg_scale: float | None = None,
    ) -> PipelineOutput:
        timer = StageTimer()
        if output_type not in OUTPUT_TYPES:
            raise RenderError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        prompts = _texts(prompt, negative_prompt)
        if strength is not None:
            strength = checked_strength(strength)
        if latents is not None:
            latents = _finite_latents(latents)
        init_image = load_image(image) if image is not None else None
        plan = self.plan(image=init_image, steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                         width=width, seed=seed, sampler=sampler, schedule=schedule,
                         images_per_prompt=num_images_per_prompt,
                         strength=strength if init_image is not None else None, eta=eta, noise=noise,
                         true_cfg_scale=true_cfg_scale)
        tile = self.check_memory(plan, len(prompts), img2img=init_image is not None)
        rng = _noise_source(plan, len(prompts), img2img=init_image is not None)
        warnings: list[str] = []
        conditioning = self.family.condition(prompts, negative_prompt, plan, self.session, warnings, timer)
        encoders = " or ".join(e.component for e in self.manifest.text_encoders)  # SDXL's feeds mix both
        for feed in conditioning.feeds.values():
            _check_finite(feed, encoders)
        sched = build_schedule(self.manifest, plan)
        x = self._initial_latents(plan, conditioning.batch, sched.init_noise_sigma, init_image, latents, rng, timer,
                                  tile)
        x, interrupted = self._loop(x, conditioning, plan, sched, rng, callback, timer)
        _check_finite(x, self.family.denoiser)
        t = time.perf_counter()
        images = self.decode(x, tile)
        timer.stage("vae_decoder", t)
        out = images if output_type == "np" else unit_to_pil(images)
        return PipelineOutput(out, timer.total(), warnings, interrupted, plan)

    def check_memory(self, plan: RenderPlan, prompts: int, *, img2img: bool) -> int | None:
        """Refuse, before anything is allocated, a render this machine cannot hold (see memory.py's estimate).
        Returns the VAE's tile side in latent pixels, or None for a whole-image pass. The server calls it before it
        queues a request."""
        images = prompts * plan.images_per_prompt
        available = memory_estimate.available_bytes()

        def need(tile: int | None) -> int:
            side = None if tile is None else tile * self.manifest.latent.downscale
            return memory_estimate.bytes_needed(
                self.manifest, plan, images=images, cfg=self.family.uses_cfg(plan), img2img=img2img,
                memory=self.memory, loaded=frozenset(self._sessions), vae_tile=None if side is None else (side, side))

        tile = self.vae_tile(plan.height, plan.width, fits=lambda: available is None or need(None) <= available)
        what = f"{images} image{'s' if images > 1 else ''} of {plan.width}x{plan.height}"
        memory_estimate.check_fits(need(tile), available, what, self.memory)
        return tile

    def vae_tile(self, height: int, width: int, fits: Callable[[], bool] = lambda: True) -> int | None:
        """The VAE's tile side in latent pixels for an image of height x width pixels, or None where it runs on the
        whole image (tiling.choose_tile, by `vae_tiling`)."""
        d = self.manifest.defaults
        return choose_tile(self.vae_tiling, height, width, (d.height, d.width), self.manifest.latent.downscale, fits)

    def _initial_latents(self, plan: RenderPlan, batch: int, init_noise_sigma: float, init_image: Image.Image | None,
                         latents: np.ndarray | None, rng: NoiseSource, timer: StageTimer,
                         tile: int | None) -> np.ndarray:
        """Unit noise (or the caller's `latents`) scaled to the schedule's first sigma; for img2img, added to the
        init image's latents."""
        shape = latent_shape(self.manifest, batch, plan.height, plan.width)
        x: np.ndarray
        if init_image is None:
            x = (_initial_noise(latents, shape, rng) * np.float32(init_noise_sigma)).astype(np.float32)
            return x
        t = time.perf_counter()
        clean = self.encode_image(init_image, plan.width, plan.height, rng.randn, tile)  # draws first, as diffusers
        clean = np.repeat(clean, batch // clean.shape[0], axis=0)
        timer.stage("vae_encoder", t)
        noise = _initial_noise(latents, shape, rng)
        if self.manifest.prediction_type == "flow":  # flow time s: (1 - s) x0 + s noise, not x0 + sigma noise
            x = (clean * np.float32(1.0 - init_noise_sigma) + noise * np.float32(init_noise_sigma)).astype(np.float32)
        else:
            x = (clean + noise * np.float32(init_noise_sigma)).astype(np.float32)
        return x

    def _loop(self, x: np.ndarray, conditioning: Conditioning, plan: RenderPlan, sched: Schedule, rng: NoiseSource,
              callback: StepCallback | None, timer: StageTimer) -> tuple[np.ndarray, bool]:
        """The sampler over the schedule; returns the final latents and whether a callback stopped it."""
        info = SAMPLERS[plan.sampler]
        options = sampler_settings(self.manifest, plan)  # DDIM's eta and clip_sample
        scheduler = self.manifest.scheduler.for_sampler(plan.sampler)
        denoise = make_denoiser(
            self.family.model(self.session(self.family.denoiser), conditioning), self.manifest.prediction_type,
            sched.timestep_for, guidance_scale=conditioning.guidance_scale,
            lcm_timestep_scaling=scheduler.timestep_scaling if info.convention == "lcm" else None,
            clip_x0=options.denoiser_clip)
        total, interrupted, t = len(sched), False, time.perf_counter()

        def on_step(i: int, x_now: np.ndarray, x0: np.ndarray) -> bool | None:
            nonlocal t, interrupted
            t = timer.stage("steps", t)
            # the sampler's x is its working buffer, updated in place next step: the caller gets its own copy
            if callback is not None and callback(i, total, x_now.copy()) is False:
                interrupted = True
                return False
            return None

        extra = {"targets": sched.targets} if sched.targets is not None else {}
        x = info.fn(denoise, x, sched.sigmas, noise=rng.randn, callback=on_step, **extra, **options.sampler)
        if not interrupted and sched.final_scale != 1.0:
            x = x * np.float32(sched.final_scale)  # DDIM / TCD stop short of sigma 0, in alpha space
        return x, interrupted

    # --- the VAE ----------------------------------------------------------------------------------------------

    def encode_image(self, image: ImageSource, width: int, height: int, noise: Noise,
                     tile: int | None = None) -> np.ndarray:
        """Init image -> latents, sampled from the VAE's posterior with the render's own noise stream; with `tile`
        (latent pixels), encoded in overlapping tiles."""
        pixels = pil_to_vae_input(load_image(image), width, height)
        moments = vae_pass(self.session("vae_encoder"), "sample", "latent_parameters", pixels, tile,
                           down=self.manifest.latent.downscale)
        _check_finite(moments, "vae_encoder")
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = mean + std * noise(mean.shape)
        scaled: np.ndarray = (latents - self.manifest.latent.shift_factor) * self.manifest.latent.scaling_factor
        return scaled.astype(np.float32)

    def decode(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Latents -> pixels in 0..1; with `tile` (latent pixels), decoded in overlapping tiles."""
        lat = self.manifest.latent
        z = (latents / np.float32(lat.scaling_factor) + np.float32(lat.shift_factor)).astype(np.float32)
        sample = vae_pass(self.session("vae_decoder"), "latent_sample", "sample", z, tile, up=lat.downscale)
        _check_finite(sample, "vae_decoder")
        return decoded_to_unit(sample)


def _noise_source(plan: RenderPlan, prompts: int, *, img2img: bool) -> NoiseSource:
    """One stream for the render, or with a list of seeds one per prompt, each prompt's images drawn as its own
    render would draw them (a server batching requests keeps each request's images)."""
    if not plan.seeds:
        return make_noise(plan.seed, plan.noise)
    if len(plan.seeds) != prompts:
        raise RenderError(f"{len(plan.seeds)} seeds for {prompts} prompts; give one seed, or one per prompt")
    if img2img:
        raise RenderError("a list of seeds is for text-to-image renders; give image-to-image one seed")
    return BatchNoise([make_noise(s, plan.noise) for s in plan.seeds], [plan.images_per_prompt] * prompts)


def _initial_noise(latents: np.ndarray | None, shape: tuple[int, ...], rng: NoiseSource) -> np.ndarray:
    if latents is None:
        return rng.randn(shape)
    if latents.shape != shape:
        raise RenderError(f"latents have shape {latents.shape}; this render needs {shape}")
    return latents


def _finite_latents(latents: Any) -> np.ndarray:
    try:
        array = np.asarray(latents, dtype=np.float32)
    except (TypeError, ValueError):
        raise RenderError("latents must be a float array") from None
    if not np.isfinite(array).all():
        raise RenderError("latents contain NaN or infinity")
    return array


def _texts(prompt: Any, negative_prompt: Any) -> list[str]:
    """The prompts as a list, each checked to be text that can be encoded: a command line's undecodable bytes
    arrive as surrogate escapes, which would fail deep in the tokenizer or be written into the PNG."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise RenderError("prompt must be a string or a non-empty list of strings")
    negatives = [] if negative_prompt is None else (
        [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))
    if not all(isinstance(n, str) for n in negatives):
        raise RenderError("negative_prompt must be a string or a list of strings")
    for what, texts in (("prompt", prompts), ("negative prompt", negatives)):
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RenderError(f"the {what} is not valid UTF-8 (an undecodable byte at character {e.start}); "
                                  "pass it as UTF-8 text") from None
    return prompts


def _check_finite(array: np.ndarray, component: str) -> None:
    """A model output with NaN or infinity would decode to a black or garbled image without a word; the usual cause
    is an fp16 graph overflowing, which the export's fp32 islands or an fp32 re-export fix."""
    if not np.isfinite(array).all():
        raise RenderError(f"the {component} produced NaN or infinity (an fp16 overflow, typically); re-export it "
                          "with fp32 islands for the overflowing ops, or in fp32 (edgediff export --precision fp32)")
