"""Reading a diffusers checkpoint folder: what it is (family, preset, schedule) and its components, one at a time."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..bundle import AddedConditions, Defaults, LatentSpace, SchedulerConfig, TextEncoder
from ..runtime.sampler_catalogue import PRESETS, SAMPLERS
from . import flow_families

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["model_index.json", "README.md", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*",
             "tokenizer_3/*", "*.safetensors", "*.safetensors.index.json"]  # SD3's T5 tokenizer; sharded weights
MODEL_CARD = "README.md"


PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class SourceError(Exception):
    """A source that cannot be exported; the message is one line saying what is wrong and what to do."""


def read_json(path: Path) -> dict:
    """A JSON object from a config file; anything else is refused in one line."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SourceError(f"{path}: not valid JSON ({e}); repair or re-save the checkpoint") from None
    if not isinstance(value, dict):
        raise SourceError(f"{path}: a JSON {type(value).__name__}, where a JSON object is expected; repair or "
                          "re-save the checkpoint")
    return value


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Weights load from safetensors; a pickle can run code as it loads, so it needs the user's explicit opt-in."""
    if path.suffix == ".safetensors":
        return
    if path.suffix not in PICKLE_SUFFIXES:
        raise SourceError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors")
    if not allow_pickle:
        raise SourceError(f"{path}: {path.suffix} files are pickles, which can run code when loaded; convert it to "
                          ".safetensors, or pass --allow-pickle if you trust its source")


def single_file_to_folder(path: Path, dest: Path, allow_pickle: bool) -> Path:
    """A single-file checkpoint (as community models ship) -> a diffusers folder at `dest`, via diffusers."""
    refuse_pickle(path, allow_pickle)
    import diffusers

    try:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), safety_checker=None)
    except Exception as e:  # diffusers needs the base model's configs (hub or cache) and raises many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SourceError(f"{path}: cannot read it as a single-file SD checkpoint ({first}); convert it with "
                          "diffusers' from_single_file(...).save_pretrained(DIR) and export DIR") from None
    pipe.save_pretrained(dest)
    del pipe
    return dest


@dataclass(frozen=True)
class Checkpoint:
    """A diffusers pipeline folder, read but not yet loaded: configs only, so nothing big sits in memory."""

    root: Path
    index: dict
    unet_config: dict
    vae_config: dict
    text_config: dict
    scheduler_config: dict
    text_config_2: dict | None = None  # SDXL's second encoder (OpenCLIP-bigG, with projection); FLUX's T5
    transformer_config: dict | None = None  # SD3 / FLUX: the MMDiT in place of a U-Net (unet_config is then {})
    text_config_3: dict | None = None  # SD3's T5 (absent when the pipeline was saved with text_encoder_3=None)

    @classmethod
    def open(cls, src: str | os.PathLike[str]) -> Checkpoint:
        root = Path(src)
        if root.is_file():
            raise SourceError(f"{src}: a single file; export_bundle converts single-file checkpoints first")
        if not root.exists() and HUB_ID.fullmatch(str(src)):
            root = _download(str(src))
        if not root.exists():
            raise SourceError(f"{src}: no such folder (a diffusers pipeline folder or a hub id is expected)")
        if not (root / "model_index.json").is_file():
            raise SourceError(
                f"{src}: not a diffusers pipeline folder (no model_index.json); "
                "save one with `pipeline.save_pretrained(DIR)`"
            )

        def config(sub: str, name: str = "config.json") -> dict:
            path = root / sub / name
            if not path.is_file():
                raise SourceError(f"{src}: incomplete diffusers pipeline ({sub}/{name} is missing)")
            return read_json(path)

        index = read_json(root / "model_index.json")
        if not _present(index, "text_encoder"):
            raise SourceError(f"{src}: no text_encoder (an SDXL refiner?); only base text-to-image checkpoints export")
        transformer = _present(index, "transformer")
        return cls(
            root=root,
            index=index,
            unet_config={} if transformer else config("unet"),
            transformer_config=config("transformer") if transformer else None,
            text_config_3=config("text_encoder_3") if _present(index, "text_encoder_3") else None,
            vae_config=config("vae"),
            text_config=config("text_encoder"),
            scheduler_config=config("scheduler", "scheduler_config.json"),
            text_config_2=config("text_encoder_2") if _present(index, "text_encoder_2") else None,
        )

    # --- what the checkpoint is -------------------------------------------------------------------------------

    @property
    def flow(self) -> flow_families.FlowCheckpoint | None:
        """The SD3 / FLUX side of this checkpoint (export/flow_families.py), None for a U-Net family."""
        return flow_families.FlowCheckpoint(self) if self.transformer_config is not None else None

    @property
    def family(self) -> str:
        if self.flow is not None:
            return self.flow.family
        if self.unet_config.get("addition_embed_type") == "text_time":
            if self.text_config_2 is None:
                raise SourceError(f"{self.root}: an SDXL U-Net without text_encoder_2; incomplete SDXL pipeline")
            return "sdxl"
        # SD 2.x conditions on OpenCLIP-H (gelu, 1024 wide); SD 1.x on CLIP-L (quick_gelu, 768 wide).
        if self.unet_config.get("cross_attention_dim") == 1024 or self.text_config.get("hidden_act") == "gelu":
            return "sd2"
        return "sd1"

    @property
    def guidance_embedding_dim(self) -> int | None:
        return self.unet_config.get("time_cond_proj_dim")

    @property
    def vae_overflows_fp16(self) -> bool:
        """SDXL's VAE overflows in fp16 (diffusers' SDXL pipelines upcast it); a fp16-safe one, such as
        sdxl-vae-fp16-fix, says so with force_upcast false in its config."""
        return self.family == "sdxl" and bool(self.vae_config.get("force_upcast", True))

    def preset(self, requested: str | None) -> str:
        if requested is not None:
            if requested not in PRESETS:
                raise SourceError(f"unknown preset {requested!r}; choose one of {', '.join(PRESETS)}")
            if self.flow is not None:
                self.flow.check_preset(requested)
            return requested
        if self.flow is not None:
            return self.flow.default_preset
        if self.guidance_embedding_dim or self.scheduler_config.get("_class_name") == "LCMScheduler":
            return "lcm"
        return "standard"

    def scheduler(self, preset: str) -> tuple[SchedulerConfig, str]:
        """The training schedule with every default filled in (via diffusers' own class), and the prediction type.
        Where a sampler's diffusers class fills a missing key differently, the manifest records its value too."""
        import diffusers

        if self.flow is not None:
            return self.flow.scheduler()
        raw = self.scheduler_config
        if raw.get("thresholding"):
            raise SourceError(f"{self.root}: the scheduler config sets thresholding (dynamic thresholding, for "
                              "pixel-space models), which edgediff does not apply; set it false to export")
        cls = getattr(diffusers, raw.get("_class_name", ""), None) or diffusers.EulerDiscreteScheduler
        full = dict(cls.from_config(raw).config)
        base = _scheduler_fields(full)
        if preset in ("turbo", "lightning"):
            base["timestep_spacing"] = "trailing"  # the distillation recipe samples from the last training timestep
        per_sampler = {}
        quiet = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # each class warns of the keys it does not take
        try:
            for name, info in SAMPLERS.items():
                theirs = dict(getattr(diffusers, info.scheduler).from_config(raw).config)
                changed = {k: v for k, v in _scheduler_fields(theirs).items() if k in theirs and v != base[k]
                           and not (k == "timestep_spacing" and preset in ("turbo", "lightning"))}
                if changed:
                    per_sampler[name] = changed
        finally:
            diffusers.utils.logging.set_verbosity(quiet)
        config = SchedulerConfig(**base, source_class=raw.get("_class_name", ""), per_sampler=per_sampler)
        return config, full.get("prediction_type", "epsilon")

    @property
    def latent(self) -> LatentSpace:
        vae = self.vae_config
        return LatentSpace(
            channels=int(vae.get("latent_channels", 4)),
            downscale=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            shift_factor=float(vae.get("shift_factor") or 0.0),
        )

    @property
    def size_multiple(self) -> int:
        # Each U-Net down block but the last halves the latent; the traced graph fixes the upsampling sizes
        # for latents that divide evenly, so the image side must be a multiple of downscale * 2**downsamples.
        if self.flow is not None:
            return self.latent.downscale * 2  # SD3's 2x2 patches, FLUX's 2x2 packing
        downsamples = len(self.unet_config.get("down_block_types", ())) - 1
        return self.latent.downscale * 2**downsamples

    def defaults(self, preset: str) -> Defaults:
        """The preset's sampler and schedule (runtime/sampler_catalogue.py PRESETS), steps and guidance, at native
        size."""
        if self.flow is not None:
            return self.flow.defaults(preset)
        side = int(self.unet_config.get("sample_size", 64)) * self.latent.downscale
        steps, guidance = {"turbo": (1, 0.0), "lightning": (4, 0.0), "standard": (20, 7.5)}.get(preset, (4, 0.0))
        if preset == "lcm":
            # With a guidance embedding the U-Net is told w directly (8 is LCM-Dreamshaper's default);
            # an LCM-LoRA U-Net without one runs plain, unguided.
            guidance = 8.0 if self.guidance_embedding_dim else 1.0
        recipe = PRESETS[preset]
        return Defaults(sampler=recipe.sampler, schedule=recipe.schedule, steps=steps, guidance_scale=guidance,
                        height=side, width=side)

    def licence(self) -> str | None:
        """The `license:` field of the model card's front matter (README.md, as the hub shows it), if any."""
        path = self.root / MODEL_CARD
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        if not lines or lines[0].strip() != "---":
            return None
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, sep, value = line.partition(":")
            value = value.strip().strip("'\"")
            if sep and key.strip() == "license" and value:
                return value
        return None

    def text_encoders(self, clip_skip: int = 0) -> tuple[TextEncoder, ...]:
        """Which hidden state each text encoder's graph outputs, as diffusers' pipeline for this family takes it
        with `clip_skip`: SD takes hidden_states[-(clip_skip + 1)] through the final layer norm (0: the last
        hidden state); SDXL takes hidden_states[-(clip_skip + 2)] without it, and encoder 2's projected pooled
        output. (diffusers applies clip_skip to the prompt only, its negatives always take the default layer;
        a bundle takes the same layer for both.)"""
        if self.flow is not None:
            return self.flow.text_encoders(clip_skip)
        sdxl = self.family == "sdxl"
        base = 2 if sdxl else 1
        for config in (self.text_config, self.text_config_2 if sdxl else None):
            layers = int((config or {}).get("num_hidden_layers", 12))
            if config is not None and not 0 <= clip_skip <= layers - base:
                raise SourceError(f"--clip-skip {clip_skip}: this model's text encoder has {layers} layers; "
                                  f"choose 0 to {layers - base}")
        if not sdxl:
            if not clip_skip:
                return (TextEncoder(),)
            return (TextEncoder(output="hidden_state", layer=-(clip_skip + 1), clip_skip=clip_skip),)
        return tuple(
            TextEncoder(
                component=name,
                tokenizer=tok,
                output="hidden_state",
                layer=-(clip_skip + 2),
                final_layer_norm=False,
                clip_skip=clip_skip,
                pooled_output=pooled,
            )
            for name, tok, pooled in (
                ("text_encoder", "tokenizer", None),
                ("text_encoder_2", "tokenizer_2", "text_embeds"),
            )
        )

    @property
    def added_conditions(self) -> AddedConditions | None:
        if self.family != "sdxl":
            return None
        return AddedConditions(force_zeros_for_empty_prompt=bool(self.index.get("force_zeros_for_empty_prompt", True)))

    def tokenizer_files(self, folder_name: str = "tokenizer") -> list[Path]:
        folder = self.root / folder_name
        files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
        has_model = any(f.name in ("tokenizer.json", "vocab.json") for f in files)
        if not has_model:
            raise SourceError(f"{self.root}: no tokenizer ({folder_name}/tokenizer.json or {folder_name}/vocab.json "
                              "+ merges.txt)")
        return files

    # --- loading components, one at a time -----------------------------------------------------------------

    def load(self, name: str, allow_pickle: bool = False):
        """Load one torch component in float32; the caller frees it before loading the next."""
        import torch
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # the export shows its own progress
        transformers_logging.disable_progress_bar()
        library, cls_name = self.index[name][:2]
        module = __import__(library)
        cls = getattr(module, cls_name)
        try:
            # without the opt-in, only safetensors weights load (diffusers would fall back to a .bin pickle)
            return cls.from_pretrained(self.root / name, torch_dtype=torch.float32,
                                       use_safetensors=None if allow_pickle else True).eval()
        except OSError as e:  # what diffusers and transformers raise when no safetensors file is there
            if allow_pickle or not any((self.root / name).glob("*.bin")):
                raise
            raise SourceError(f"{self.root / name}: weights only as .bin pickles, which can run code when loaded; "
                              "pass --allow-pickle if you trust its source") from e


def _scheduler_fields(full: dict) -> dict:
    """A diffusers scheduler's resolved config as SchedulerConfig's fields (less source_class and per_sampler)."""
    betas = full.get("trained_betas")
    return dict(
        num_train_timesteps=int(full.get("num_train_timesteps", 1000)),
        beta_start=float(full.get("beta_start", 0.00085)),
        beta_end=float(full.get("beta_end", 0.012)),
        beta_schedule=full.get("beta_schedule", "scaled_linear"),
        trained_betas=tuple(float(b) for b in betas) if betas is not None else None,
        timestep_spacing=full.get("timestep_spacing", "leading"),
        steps_offset=int(full.get("steps_offset", 0)),
        rescale_betas_zero_snr=bool(full.get("rescale_betas_zero_snr", False)),
        original_inference_steps=int(full.get("original_inference_steps", 50)),
        timestep_scaling=float(full.get("timestep_scaling", 10.0)),
        set_alpha_to_one=bool(full.get("set_alpha_to_one", False)),
        clip_sample=bool(full.get("clip_sample", False)),
        clip_sample_range=float(full.get("clip_sample_range", 1.0)),
    )


def _present(index: dict, name: str) -> bool:
    """Whether model_index.json lists `name` as a component (diffusers writes [null, null] for an absent one)."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _download(repo_id: str) -> Path:
    """A hub id where a network exists: fetch the pipeline's configs, tokenizer and safetensors weights only."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated: all end the export the same way
        raise SourceError(f"{repo_id}: cannot fetch from the hub ({type(e).__name__}); pass a local folder") from None
