"""Export specs of the SD3 / FLUX components that the U-Net families lack: the MMDiT transformers and T5's encoder.

Names follow Optimum's ONNX exporter (`transformer/model.onnx` with hidden_states, encoder_hidden_states,
pooled_projections, timestep; FLUX's img_ids, txt_ids and guidance; out_hidden_states). The graphs are plain
standard operators at the exporter's opset: attention traces to MatMul / Softmax, FLUX's rotary embedding to
Cos / Sin / Mul over the position ids it is fed, so any ONNX backend runs them (a backend may fuse at load).
"""

from __future__ import annotations

import torch

from ..bundle import TensorSpec
from .specs import ComponentSpec, _randn


class _T5Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return (self.model(input_ids=input_ids, return_dict=True).last_hidden_state,)


def t5_encoder_spec(model, name: str) -> ComponentSpec:
    cfg = model.config

    def sample(dims, g):
        ids = torch.randint(2, cfg.vocab_size, (dims["batch"], dims["sequence"]), generator=g)
        ids[:, -3:] = 0  # padding after the text, as the tokenizer pads
        ids[:, -4] = cfg.eos_token_id if cfg.eos_token_id is not None else 1
        return {"input_ids": ids}

    return ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", "sequence", cfg.d_model)),),
        wrap=_T5Encoder,
        sample=sample,
    )


class _SD3Transformer(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return (self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0],)


class _RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm (FLUX's query / key norms) in plain operators: the TorchScript exporter has no rms_norm."""

    def __init__(self, norm: torch.nn.RMSNorm):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight if self.weight is not None else x


def _plain_rms_norms(model: torch.nn.Module) -> None:
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is torch.nn.RMSNorm]
    for parent, name, child in swaps:
        parent._modules[name] = _RMSNorm(child)


def _rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb as FLUX calls it (real cos / sin, pairs interleaved), with the pairs split by
    unflatten: its `x.reshape(*x.shape[:-1], -1, 2)` traces the batch and token counts as constants."""
    cos, sin = freqs_cis
    index = (None, None) if sequence_dim == 2 else (None, slice(None), None)
    cos, sin = cos[index], sin[index]
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class _FluxTransformer(torch.nn.Module):
    """The norms are swapped in place (the exporter loaded the transformer, nothing else holds it), so the parity
    gate runs the very module that was traced; the rotary embedding is swapped while it runs."""

    def __init__(self, transformer):
        super().__init__()
        _plain_rms_norms(transformer)
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        from unittest import mock

        from diffusers.models.transformers import transformer_flux

        with mock.patch.object(transformer_flux, "apply_rotary_emb", _rotary):
            return self._run(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                             guidance)

    def _run(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance):
        return (self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                 txt_ids=txt_ids, guidance=guidance, return_dict=False)[0],)


def _text_inputs(cfg) -> list[TensorSpec]:
    return [TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", cfg.joint_attention_dim)),
            TensorSpec("pooled_projections", "float32", ("batch", cfg.pooled_projection_dim))]


def sd3_transformer_spec(transformer) -> ComponentSpec:
    cfg = transformer.config
    latent = ("batch", cfg.in_channels, "latent_height", "latent_width")

    def sample(dims, g):
        b = dims["batch"]
        return {
            "hidden_states": _randn((b, cfg.in_channels, dims["latent_height"], dims["latent_width"]), g),
            "encoder_hidden_states": _randn((b, dims["sequence"], cfg.joint_attention_dim), g),
            "pooled_projections": _randn((b, cfg.pooled_projection_dim), g),
            "timestep": torch.rand(b, generator=g) * 1000.0,  # SD3 is told t = 1000 sigma
        }

    return ComponentSpec(
        name="transformer",
        inputs=(TensorSpec("hidden_states", "float32", latent), *_text_inputs(cfg),
                TensorSpec("timestep", "float32", ("batch",))),
        outputs=(TensorSpec("out_hidden_states", "float32",
                            ("batch", cfg.out_channels or cfg.in_channels, "latent_height", "latent_width")),),
        wrap=_SD3Transformer,
        sample=sample,
    )


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """FluxPipeline's latent position ids: (0, row, column) per packed token, row-major."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_transformer_spec(transformer) -> ComponentSpec:
    cfg = transformer.config
    guidance = bool(cfg.guidance_embeds)
    inputs = [TensorSpec("hidden_states", "float32", ("batch", "image_sequence", cfg.in_channels)), *_text_inputs(cfg),
              TensorSpec("timestep", "float32", ("batch",)),
              TensorSpec("img_ids", "float32", ("image_sequence", 3)),
              TensorSpec("txt_ids", "float32", ("sequence", 3))]
    if guidance:
        inputs.append(TensorSpec("guidance", "float32", ("batch",)))

    def sample(dims, g):
        b, h, w = dims["batch"], dims["latent_height"] // 2, dims["latent_width"] // 2
        feeds = {
            "hidden_states": _randn((b, h * w, cfg.in_channels), g),
            "encoder_hidden_states": _randn((b, dims["sequence"], cfg.joint_attention_dim), g),
            "pooled_projections": _randn((b, cfg.pooled_projection_dim), g),
            "timestep": torch.rand(b, generator=g),  # FLUX is told sigma itself
            "img_ids": flux_image_ids(h, w),
            "txt_ids": torch.zeros(dims["sequence"], 3),
        }
        if guidance:
            feeds["guidance"] = 1.0 + torch.rand(b, generator=g) * 6.0
        return feeds

    return ComponentSpec(
        name="transformer",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_hidden_states", "float32",
                            ("batch", "image_sequence", cfg.out_channels or cfg.in_channels)),),
        wrap=_FluxTransformer,
        sample=sample,
    )


TRANSFORMER_SPECS = {"sd3": sd3_transformer_spec, "flux": flux_transformer_spec}
