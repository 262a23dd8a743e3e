"""Tiny random-weight SD3 and FLUX.1 pipelines (MMDiT transformers, CLIP-L / CLIP-G with projection, T5, a
16-channel-style VAE with shift and scaling factors), saved as checkpoint folders for export tests.

Shapes follow diffusers' own pipeline tests, shrunk: widths differ per encoder so that a swapped concatenation or
a wrong pooled source shows. The T5 tokenizer is a T5-style Unigram model built with `tokenizers` (through
transformers' T5TokenizerFast), as no hub is reachable.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from tiny_pipelines import write_clip_tokenizer_files

CLIP_WIDTHS = (16, 24)  # SD3's CLIP-L and CLIP-G hidden sizes
CLIP_PROJECTIONS = (12, 20)  # their projection_dim: SD3's pooled width is the sum
T5_WIDTH = 48  # d_model, the transformers' joint_attention_dim
FLUX_CLIP_WIDTH = 32  # FLUX's CLIP-L pooler_output width, its pooled_projection_dim
T5_WORDS = ("a red cat on sofa blue dog in the snow blurry low quality ugly lighthouse at dusk oil painting green "
            "tree house river mountain").split()
# name: (transformer class, T5 present, FLUX guidance embedding, the model card's licence)
FAMILIES = {
    "sd3": ("sd3", True, False, "other"),
    "sd3_no_t5": ("sd3", False, False, "other"),
    "flux_dev": ("flux", True, True, "flux-1-dev-non-commercial-license"),
    "flux_schnell": ("flux", True, False, "apache-2.0"),
}


def t5_tokenizer():
    """A T5-style Unigram tokenizer built with `tokenizers` (pad 0, </s> 1, <unk> 2, '▁'-prefixed words, single
    characters; Metaspace pre-tokenizer, </s> appended), wrapped as transformers' T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0 - i * 0.01) for i, w in enumerate(T5_WORDS)] + [("▁", -3.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _clip(cls, vocab_size: int, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                              bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                              **extra))


def _vae(latent_channels: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor,
                         scaling_factor=scaling_factor)


def _perturb(*modules) -> None:
    """Real checkpoints are not at initialisation: zero-initialised layers (adaLN modulations, output projections)
    would hide every path behind them."""
    import torch

    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Build and save a tiny `family` pipeline (FAMILIES) into `out`; returns `out`."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kind, with_t5, guidance, licence = FAMILIES[family]
    torch.manual_seed(seed)
    tok_dir = out / "_tok"
    vocab = write_clip_tokenizer_files(tok_dir)
    t5_tok = t5_tokenizer()
    t5 = _t5(len(t5_tok)) if with_t5 else None
    if kind == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
            pooled_projection_dim=sum(CLIP_PROJECTIONS), pos_embed_max_size=32, qk_norm="rms_norm",
            dual_attention_layers=(0,))  # SD3.5 Medium's MMDiT-X blocks and qk norm
        vae = _vae(16, 0.0609, 1.5305)
        _perturb(transformer, vae)
        diffusers.StableDiffusion3Pipeline(
            transformer=transformer, vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=_clip(CLIPTextModelWithProjection, vocab, CLIP_WIDTHS[0], projection_dim=CLIP_PROJECTIONS[0]),
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
            text_encoder_2=_clip(CLIPTextModelWithProjection, vocab, CLIP_WIDTHS[1],
                                 projection_dim=CLIP_PROJECTIONS[1]),
            tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!"),
            text_encoder_3=t5, tokenizer_3=t5_tok if with_t5 else None,
        ).save_pretrained(out)
    else:
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=FLUX_CLIP_WIDTH,
            guidance_embeds=guidance, axes_dims_rope=(4, 4, 8))
        vae = _vae(4, 0.1159, 0.3611)
        _perturb(transformer, vae)
        # a short image-token range, so that the tiny sizes' mu differ as much as 256^2 and 1024^2 do at full size
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=4,
                                                              max_image_seq_len=64)
        diffusers.FluxPipeline(
            transformer=transformer, vae=vae, scheduler=scheduler,
            text_encoder=_clip(CLIPTextModel, vocab, FLUX_CLIP_WIDTH),
            tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
            text_encoder_2=t5, tokenizer_2=t5_tok,
        ).save_pretrained(out)
    shutil.rmtree(tok_dir)
    (out / "README.md").write_text(f"---\nlicense: {licence}\n---\n# a tiny {family}\n")
    return out
