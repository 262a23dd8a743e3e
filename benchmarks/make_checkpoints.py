"""Full-size diffusers checkpoints with random weights: the real architectures' compute and memory cost.

No weights can be downloaded here, so benchmarks run on the real configs with random weights. Usage:

    python benchmarks/make_checkpoints.py sd-turbo benchmarks/checkpoints/sd-turbo
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

# SD 2.1-base anatomy (SD-Turbo is a distilled SD 2.1 at 512 px): OpenCLIP-H text encoder, 865 M-parameter U-Net.
SD_TURBO = {
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    ),
    "text_encoder": dict(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=768,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    ),
    "scheduler": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing",
    ),
    "pad_token": "!",
}

ARCHITECTURES = {"sd-turbo": SD_TURBO}
CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-tokenizer"


def make(name: str, out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    tok_dir = out.parent / f".{out.name}-tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_TOKENIZER / f, tok_dir / f)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token=arch["pad_token"]),
        unet=UNet2DConditionModel(**arch["unet"]),
        scheduler=EulerDiscreteScheduler(**arch["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for f in ("vocab.json", "merges.txt"):  # as real checkpoints ship them; older transformers need them
        shutil.copyfile(tok_dir / f, out / "tokenizer" / f)
    shutil.rmtree(tok_dir)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if not (CLIP_TOKENIZER / "vocab.json").is_file():
        print(f"error: the CLIP tokenizer files are expected in {CLIP_TOKENIZER}", file=sys.stderr)
        return 2
    make(args.architecture, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
