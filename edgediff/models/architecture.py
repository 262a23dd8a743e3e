"""The built-in model's anatomy: Stable Diffusion's, shrunk to the coloured-shapes world.

Word-level tokenizer -> small CLIP text encoder -> small conditional U-Net (cross-attention, v-prediction) on
8x8x4 latents -> small KL VAE with a 4x downscale to 32x32 pixels. Every part is a stock diffusers / transformers
class, so the ordinary export path (`edgediff.export.convert.export_bundle`) handles the model like any other
Stable Diffusion checkpoint; `save_pipeline` writes the diffusers folder it reads.

torch, diffusers and transformers are imported inside the builders only: `edgediff.models` must stay importable
(and the bundle's path findable) without them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .shapes import VOCABULARY

IMAGE_SIZE = 32
# The longest grammar caption is 13 words + bos + eos; the rest leaves room for a few extra words in a prompt.
MAX_LENGTH = 20
# The exporter traces the text encoder at CLIP's 77 tokens, so the position table must be at least that long,
# even though prompts are cut at MAX_LENGTH.
MAX_POSITIONS = 77
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
# eos must not be id 2: transformers' CLIP then pools at the argmax id (its legacy mode), not at the eos.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# "." ends a sentence in many prompts; knowing it keeps it out of the "unknown words" warning.
EXTRA_WORDS = (".",)

# LCM: the teacher's DDIM schedule the student is distilled over (and the runtime's `lcm` schedule skips
# along): each distillation trajectory costs this many guided teacher calls (models/distill.py).
ORIGINAL_INFERENCE_STEPS = 20
DESCRIPTION = (
    "edgediff's built-in model: coloured circles, squares and triangles (red, yellow, green, cyan, blue, purple), "
    "one or two, left of / right of / above / below each other, 32x32 px; trained on CPU from a seed by "
    "python -m edgediff.models.train, LCM-distilled for 4 steps"
)
# The bundle's default guidance (w + 1), inside the distillation's w range (train.RunConfig: w in [1.5, 3.5]);
# None keeps the exporter's (8, outside it). 4 lcm steps, 500 two-object prompts, all-correct: guidance 3: 95.6 %,
# 4: 96.2 %, 4.5: 96.4 %.
DEFAULT_GUIDANCE: float | None = 4.0
PREDICTION_TYPE = "v_prediction"  # well conditioned at t=999, where one-step LCM sampling starts


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 3
    num_attention_heads: int = 4


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: tuple[int, ...] = (2, 4)  # diffusers' `attention_head_dim` means heads (legacy naming)
    norm_num_groups: int = 32
    guidance_embedding_dim: int = 128  # the LCM student's time_cond_proj_dim


@dataclass(frozen=True)
class VaeConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # three levels: a 4x downscale
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        def tuples(x: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}

        return cls(TextConfig(**d["text"]), UNetConfig(**tuples(d["unet"])), VaeConfig(**tuples(d["vae"])))


# A few-hundred-kilobyte model of the same shape, for smoke runs and tests of the training code.
TINY = ModelConfig(
    TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_heads=(1, 2), norm_num_groups=16,
               guidance_embedding_dim=32),
    VaeConfig(block_out_channels=(16, 16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8),
)
PRESETS = {"full": ModelConfig(), "tiny": TINY}


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def vocabulary() -> list[str]:
    """Special tokens first (fixed ids 0-3), then the grammar's words: ids never depend on set ordering."""
    return [*SPECIAL_TOKENS, *sorted(set(VOCABULARY) | set(EXTRA_WORDS))]


def token_ids() -> dict[str, int]:
    return {token: i for i, token in enumerate(vocabulary())}


def build_tokenizer():
    """The word-level tokenizer: lowercase, split on whitespace and punctuation, bos ... eos, padded.

    Whitespace splitting is `\\w+|[^\\w\\s]+`, the same split as `shapes.split_caption` for grammar captions,
    so a caption's words and its tokens correspond one to one.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    ids = token_ids()
    tokenizer = Tokenizer(WordLevel(ids, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.enable_truncation(MAX_LENGTH)
    tokenizer.enable_padding(length=MAX_LENGTH, pad_id=ids[PAD], pad_token=PAD)
    return tokenizer


def save_tokenizer(folder: Path) -> None:
    """tokenizer.json (canonical: padded and truncated) plus the config transformers reads at export."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "padding_side": "right",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_captions(captions: list[str]):
    """int64 [n, MAX_LENGTH] token ids, exactly as the runtime's tokenizer produces them."""
    import numpy as np

    tokenizer = build_tokenizer()
    return np.array([e.ids for e in tokenizer.encode_batch(captions)], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# Models


def build_text_encoder(cfg: TextConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = token_ids()
    config = CLIPTextConfig(
        vocab_size=len(ids),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=MAX_POSITIONS,
        hidden_act="quick_gelu",
        projection_dim=cfg.hidden_size,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    return CLIPTextModel(config)


def build_unet(cfg: UNetConfig, text_dim: int, *, student: bool):
    """The teacher has no guidance input; the student adds LCM's guidance embedding (time_cond_proj_dim)."""
    from diffusers import UNet2DConditionModel

    levels = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=text_dim,
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
        time_cond_proj_dim=cfg.guidance_embedding_dim if student else None,
    )


def student_from_teacher(teacher, cfg: UNetConfig):
    """The LCM student: the teacher's weights plus a zero-initialised guidance projection, so that it starts
    out computing exactly what the teacher computes (as diffusers' LCM distillation script does)."""
    import torch

    student = build_unet(cfg, teacher.config.cross_attention_dim, student=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in name for name in missing):
        raise RuntimeError(f"teacher and student U-Nets differ beyond the guidance projection: {missing} {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def build_vae(cfg: VaeConfig):
    from diffusers import AutoencoderKL

    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=IMAGE_SIZE,
    )


def scheduler_config() -> dict:
    """The noise schedule (Stable Diffusion's) with LCM's settings, as an LCMScheduler config."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=PREDICTION_TYPE,
        original_inference_steps=ORIGINAL_INFERENCE_STEPS,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
    )
    return dict(scheduler.config)  # type: ignore[attr-defined]  # set by diffusers' register_to_config


def save_pipeline(folder: Path, text_encoder, unet, vae, *, teacher: bool = False) -> Path:
    """A diffusers pipeline folder (what `export_bundle` reads), written in place.

    The student is saved as a LatentConsistencyModelPipeline with LCM's scheduler; `teacher` saves a plain
    StableDiffusionPipeline with a trailing Euler schedule instead, to sample the teacher for diagnosis."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    save_tokenizer(folder / "tokenizer")
    config = scheduler_config()
    if teacher:
        pipeline_class, scheduler_class = "StableDiffusionPipeline", "EulerDiscreteScheduler"
        config["timestep_spacing"] = "trailing"  # start sampling at t = 999, as the LCM student does
    else:
        pipeline_class, scheduler_class = "LatentConsistencyModelPipeline", "LCMScheduler"
    getattr(diffusers, scheduler_class).from_config(config).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
