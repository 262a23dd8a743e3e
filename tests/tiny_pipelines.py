"""Tiny random-weight diffusers pipelines of each family, saved as checkpoint folders for export tests.

The architectures are the real ones (CLIP text encoder, conditional U-Net with cross-attention, KL VAE with 8x
downscale), shrunk to a few hundred kilobytes of weights; the tokenizer is the real CLIP BPE from shared data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-tokenizer"


def _byte_level_clip_vocab(folder: Path) -> None:
    """A minimal CLIP-format BPE (every byte alone and word-final, no merges) for machines without shared data."""
    import json

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def write_clip_tokenizer_files(folder: Path) -> int:
    """vocab.json + merges.txt into `folder`: the real CLIP BPE where shared data has it. Returns the vocab size."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    if (CLIP_TOKENIZER / "vocab.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(CLIP_TOKENIZER / name, folder / name)
    else:
        _byte_level_clip_vocab(folder)
    return len(json.loads((folder / "vocab.json").read_text()))

FAMILIES = {
    # name: (prediction type, scheduler class, timestep spacing, text activation, linear projection, LCM cond dim)
    "sd1": ("epsilon", "PNDMScheduler", "leading", "quick_gelu", False, None),
    "sd2": ("v_prediction", "EulerDiscreteScheduler", "linspace", "gelu", True, None),
    "lcm": ("epsilon", "LCMScheduler", "leading", "quick_gelu", False, 32),
    # SDXL: CLIP-L-like (quick_gelu) and bigG-like (gelu, projected) encoders of different widths, so that a swapped
    # concatenation or a wrong pooled source shows
    "sdxl": ("epsilon", "EulerDiscreteScheduler", "leading", "quick_gelu", True, None),
    "sdxl_lcm": ("epsilon", "LCMScheduler", "leading", "quick_gelu", True, 32),
}
SDXL_WIDTHS = (24, 32)  # hidden sizes of text_encoder and text_encoder_2
SDXL_POOLED = 16  # text_encoder_2's projection_dim
SDXL_TIME_EMBED = 8  # addition_time_embed_dim


def _clip(cls, vocab_size: int, hidden: int, act: str, **extra):
    from transformers import CLIPTextConfig

    return cls(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=extra.pop("layers", 2),
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            **extra,
        )
    )


def _unet(family: str):
    from diffusers import UNet2DConditionModel

    _, _, _, _, linear, cond_dim = FAMILIES[family]
    common = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=linear,
                  time_cond_proj_dim=cond_dim)
    if not family.startswith("sdxl"):
        return UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            **common,
        )
    # as diffusers' own SDXL pipeline tests build it: the added "text_time" embedding of 6 size numbers + pooled
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=sum(SDXL_WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_POOLED,
        **common,
    )


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Build and save a tiny `family` pipeline into `out` (SD3 and FLUX: tiny_transformers.py); returns `out`."""
    import tiny_transformers

    if family in tiny_transformers.FAMILIES:
        return tiny_transformers.build(family, out, seed)
    import diffusers
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    prediction, scheduler_cls, spacing, act, linear, cond_dim = FAMILIES[family]
    sdxl = family.startswith("sdxl")
    torch.manual_seed(seed)
    unet = _unet(family)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **({"scaling_factor": 0.13025} if sdxl else {}),
    )
    tok_dir = out / "_tok"
    vocab_size = write_clip_tokenizer_files(tok_dir)
    text_encoder = _clip(CLIPTextModel, vocab_size, SDXL_WIDTHS[0] if sdxl else 32, act, layers=3 if sdxl else 2)
    # Real checkpoints' U-Nets and VAEs are not at initialisation: perturb the zero-initialised layers (e.g. the
    # U-Net's conv_out) so that every path, text conditioning included, reaches the image.
    with torch.no_grad():
        for module in (unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = getattr(diffusers, scheduler_cls)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction,
        timestep_spacing=spacing,
        steps_offset=1,
        **({"skip_prk_steps": True} if scheduler_cls == "PNDMScheduler" else {}),
    )
    # CLIPTokenizer(vocab_file, merges_file) ignores both files in transformers 5; from_pretrained reads them.
    tokenizer = CLIPTokenizer.from_pretrained(
        tok_dir, model_max_length=77, **({"pad_token": "!"} if family == "sd2" else {})
    )
    if sdxl:
        diffusers.StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=_clip(CLIPTextModelWithProjection, vocab_size, SDXL_WIDTHS[1], "gelu", layers=3,
                                 projection_dim=SDXL_POOLED),
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        ).save_pretrained(out)
        shutil.rmtree(tok_dir)
        return out
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    if family == "sd1":
        # Checkpoints carry their tokenizer as tokenizer.json or as vocab.json + merges.txt: cover the second form.
        (out / "tokenizer" / "tokenizer.json").unlink()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    shutil.rmtree(tok_dir)
    return out
