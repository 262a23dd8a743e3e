"""Full-size diffusers checkpoints with random weights: the real architectures' compute and memory cost.

No weights can be downloaded here, so benchmarks run on the real configs with random weights. Usage:

    python benchmarks/make_checkpoints.py sd-turbo benchmarks/checkpoints/sd-turbo
    python benchmarks/make_checkpoints.py sdxl-turbo benchmarks/checkpoints/sdxl-turbo   # ~14 GB in fp32, 11 GB RSS
    python benchmarks/make_checkpoints.py sdxl-turbo benchmarks/checkpoints/sdxl-turbo --fp16   # ~7 GB on disk
    python benchmarks/make_checkpoints.py sdxs-512 benchmarks/checkpoints/sdxs-512   # 1.8 GB
    python benchmarks/make_checkpoints.py taesdxl benchmarks/checkpoints/taesdxl-random   # a tiny VAE, 10 MB
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

# SDXL-Turbo (stabilityai/sdxl-turbo's configs; SDXL 1.0 base but for sample_size 128 and the scheduler): CLIP-L and
# OpenCLIP-bigG text encoders, a 2.6 B-parameter U-Net with size micro-conditioning, the SDXL VAE, 512 px.
SDXL_TURBO = {
    "pipeline": "StableDiffusionXLPipeline",
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
        addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 size numbers x 256 + the 1280-wide pooled embedding
    ),
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ),
    "text_encoder_2": dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    ),
    "scheduler_class": "EulerAncestralDiscreteScheduler",
    "scheduler": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="trailing",
    ),
    "pad_token": "<|endoftext|>",
    "pad_token_2": "!",
}

# SDXS-512-DreamShaper (IDKiro/sdxs-512-dreamshaper; arXiv 2403.16627): an SD 1.5 CLIP-L text encoder, a U-Net
# slimmed by block removal (three levels, one ResNet per level, no mid block: 316 M parameters, the hub's 1.26 GB
# fp32 file) and TAESD as the checkpoint's own VAE; one step, no CFG. Configs as the hub ships them (the unet, vae
# and text_encoder config.json files of revision 76f7202, as mirrored in lsb/6-bit-palettized-sdxs-512-dreamshaper);
# the U-Net keys past the mirror's excerpt (up blocks, conv projections) from stable-diffusion.cpp's SDXS_512_DS
# variant, which loads the real weights. The scheduler file was not found: the SD 1.5 training betas stand in;
# the bundle's turbo preset (one step from timestep 999, as the model card's pipeline call runs) fixes what runs.
SDXS_512 = {
    "unet": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None,
        cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    ),
    "text_encoder": dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
    "vae_class": "AutoencoderTiny",
    "vae": dict(),  # diffusers' AutoencoderTiny defaults, as the hub's vae/config.json lists them
    "scheduler": dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1,
    ),
    "pad_token": "<|endoftext|>",
}

ARCHITECTURES = {"sd-turbo": SD_TURBO, "sdxl-turbo": SDXL_TURBO, "sdxs-512": SDXS_512}
# Tiny VAEs (madebyollin/taesd, madebyollin/taesdxl): both are diffusers' AutoencoderTiny defaults (scaling factor
# 1.0, no shift); they differ only in their trained weights, TAESDXL decoding the SDXL VAE's latent space.
TINY_VAES = ("taesd", "taesdxl")
CLIP_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-tokenizer"


def make_tiny_vae(out: Path, seed: int = 0) -> Path:
    """AutoencoderTiny at its defaults, every weight nudged off its initial value as benchmarks/checkpoints/
    taesd-random's were (benchmarks/RESULTS.md): random weights of the trained model's architecture."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae.save_pretrained(out, safe_serialization=True)
    return out


def make(name: str, out: Path, seed: int = 0, fp16: bool = False) -> Path:
    """Build and save one component at a time, so that the peak is the largest component (SDXL's 10.3 GB U-Net),
    not the whole pipeline; model_index.json is written as diffusers' save_pretrained writes it."""
    import gc
    import json

    import diffusers
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    arch = ARCHITECTURES[name]
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    sdxl = "text_encoder_2" in arch  # the second encoder has the projection whose pooled output the U-Net takes
    vae_class = AutoencoderTiny if arch.get("vae_class") == "AutoencoderTiny" else AutoencoderKL
    builders = {
        "vae": lambda: vae_class(**arch["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
        **({"text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"]))}
           if sdxl else {}),
        "unet": lambda: UNet2DConditionModel(**arch["unet"]),
        "scheduler": lambda: getattr(diffusers, arch.get("scheduler_class", "EulerDiscreteScheduler"))(
            **arch["scheduler"]),
    }
    index = {
        "_class_name": arch.get("pipeline", "StableDiffusionPipeline"),
        "_diffusers_version": diffusers.__version__,
    }
    for component, build in builders.items():
        module = build()
        if fp16 and component != "scheduler":
            module = module.half()  # the exporter loads in fp32 whatever the files hold: only disk is halved
        module.save_pretrained(out / component, **({} if component == "scheduler" else {"safe_serialization": True}))
        library = "transformers" if component.startswith("text_encoder") else "diffusers"
        index[component] = [library, type(module).__name__]
        del module
        gc.collect()
    for folder, pad in (("tokenizer", "pad_token"), ("tokenizer_2", "pad_token_2")):
        if folder == "tokenizer_2" and not sdxl:
            continue
        (out / folder).mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):  # as real checkpoints ship them; older transformers need them
            shutil.copyfile(CLIP_TOKENIZER / f, out / folder / f)
        CLIPTokenizer.from_pretrained(out / folder, model_max_length=77, pad_token=arch[pad]).save_pretrained(
            out / folder
        )
        index[folder] = ["transformers", "CLIPTokenizer"]
    if sdxl:
        index.update(force_zeros_for_empty_prompt=True, feature_extractor=[None, None], image_encoder=[None, None])
    else:
        index.update(feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False,
                     safety_checker=[None, None])
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted([*ARCHITECTURES, *TINY_VAES]))
    parser.add_argument("out", type=Path)
    parser.add_argument("--fp16", action="store_true",
                        help="save the weights in half precision (half the disk, as the hub's fp16 variants)")
    args = parser.parse_args(argv)
    if not (CLIP_TOKENIZER / "vocab.json").is_file():
        print(f"error: the CLIP tokenizer files are expected in {CLIP_TOKENIZER}", file=sys.stderr)
        return 2
    if args.architecture in TINY_VAES:
        make_tiny_vae(args.out, seed=TINY_VAES.index(args.architecture) + 1)
    else:
        make(args.architecture, args.out, fp16=args.fp16)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
