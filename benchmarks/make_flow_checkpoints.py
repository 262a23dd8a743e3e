"""Full-size flow-matching checkpoints with random weights (issue 13): SD3.5 Medium's architecture, and T5-XXL alone.

No weights can be downloaded here, so the full-size transformer benchmarks run on the real configs with random
weights. Usage:

    python benchmarks/make_flow_checkpoints.py sd3.5-medium benchmarks/checkpoints/sd3.5-medium   # ~13 GB fp32
    python benchmarks/make_flow_checkpoints.py t5-xxl benchmarks/checkpoints/t5-xxl --fp16         # ~9.5 GB

sd3.5-medium is saved without T5 (`text_encoder_3=None`, as diffusers allows): T5-XXL in fp32 (19 GB) beside the
rest does not fit diffusers on a 24 GB machine. Components are built and saved one at a time, so the peak is the
largest (the 2.5 B-parameter MMDiT, ~10 GB in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from pathlib import Path

from make_checkpoints import CLIP_TOKENIZER, SDXL_TURBO

# stabilityai/stable-diffusion-3.5-medium: the MMDiT-X (24 joint blocks, 24 heads x 64, dual attention in blocks
# 0-12, RMS qk-norm; 2.24 B parameters counted from this config, "2.5 B" in Stability's announcement), CLIP-L and
# OpenCLIP-bigG with projections (pooled 768 + 1280 = 2048), the 16-channel VAE without quant convs, flow matching
# with static shift 3.0. Not yet run at full size: the next step of issue 13 (docs/transformers.md).
SD35_MEDIUM = {
    "transformer": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    # the same CLIP-L and OpenCLIP-bigG as SDXL's
    "text_encoder": SDXL_TURBO["text_encoder"],
    "text_encoder_2": SDXL_TURBO["text_encoder_2"],
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, norm_num_groups=32, sample_size=1024,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0),
}
# google/t5-v1_1-xxl's encoder, as SD3 and FLUX.1 ship it (text_encoder_3 / text_encoder_2): 4.76 B parameters.
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, tie_word_embeddings=False)


def _save(module, folder: Path, fp16: bool) -> str:
    if fp16:
        module = module.half()  # the exporter loads in fp32 whatever the files hold: only disk is halved
    module.save_pretrained(folder, safe_serialization=True)
    name = type(module).__name__
    del module
    gc.collect()
    return name


def make_sd35_medium(out: Path, fp16: bool = False, seed: int = 0) -> Path:
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
             "text_encoder_3": [None, None], "tokenizer_3": [None, None], "feature_extractor": [None, None],
             "image_encoder": [None, None]}
    builders = {
        "transformer": ("diffusers", lambda: diffusers.SD3Transformer2DModel(**SD35_MEDIUM["transformer"])),
        "vae": ("diffusers", lambda: diffusers.AutoencoderKL(**SD35_MEDIUM["vae"])),
        "text_encoder": ("transformers", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**SD35_MEDIUM["text_encoder"]))),
        "text_encoder_2": ("transformers", lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**SD35_MEDIUM["text_encoder_2"]))),
    }
    for component, (library, build) in builders.items():
        index[component] = [library, _save(build(), out / component, fp16)]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**SD35_MEDIUM["scheduler"])
    scheduler.save_pretrained(out / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (out / folder).mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(CLIP_TOKENIZER / f, out / folder / f)
        CLIPTokenizer.from_pretrained(out / folder, model_max_length=77, pad_token=pad).save_pretrained(out / folder)
        index[folder] = ["transformers", "CLIPTokenizer"]
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return out


def make_t5_xxl(out: Path, fp16: bool = False, seed: int = 0) -> Path:
    """T5-XXL's encoder alone. With fp16 it is built in half precision from the start (9.5 GB held, not 19)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if fp16 else torch.float32)
    try:
        _save(T5EncoderModel(T5Config(**T5_XXL)), out, fp16=False)
    finally:
        torch.set_default_dtype(previous)
    return out


MAKERS = {"sd3.5-medium": make_sd35_medium, "t5-xxl": make_t5_xxl}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(MAKERS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--fp16", action="store_true", help="save the weights in half precision (half the disk)")
    args = parser.parse_args(argv)
    if not (CLIP_TOKENIZER / "vocab.json").is_file():
        print(f"error: the CLIP tokenizer files are expected in {CLIP_TOKENIZER}", file=sys.stderr)
        return 2
    print(MAKERS[args.architecture](args.out, fp16=args.fp16))
    return 0


if __name__ == "__main__":
    sys.exit(main())
