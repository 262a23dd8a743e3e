"""Per-component export specs: input/output names, dtypes and dynamic axes, sample inputs, and the torch wrapper.

Names follow Optimum's ONNX exporter so that a bundle reads like an Optimum export. Each spec's `wrap` returns a
module whose forward takes the inputs positionally, in spec order, and returns the outputs as a tuple: that is
what the TorchScript exporter traces and what the parity gate calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..bundle import TensorSpec


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    sample: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs + self.outputs
        }


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class _UNet(torch.nn.Module):
    def __init__(self, unet, with_cond: bool):
        super().__init__()
        self.unet = unet
        self.with_cond = with_cond

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return (
            self.unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                timestep_cond=timestep_cond if self.with_cond else None,
                return_dict=False,
            )[0],
        )


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return (self.vae.decode(latent_sample, return_dict=False)[0],)


class _VaeEncoder(torch.nn.Module):
    """Outputs the latent distribution's moments (mean and log-variance stacked on channels), as Optimum does:
    the runtime samples from them with its own seeded noise, so img2img can match diffusers' generator."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        moments = self.vae.encoder(sample)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return (moments,)


def _randn(shape, g):
    return torch.randn(*shape, generator=g)


def text_encoder_spec(model) -> ComponentSpec:
    cfg = model.config
    pooled = getattr(cfg, "projection_dim", None) if hasattr(model, "text_projection") else None
    pooled_dim = pooled or cfg.hidden_size

    def sample(dims, g):
        ids = torch.randint(0, cfg.vocab_size - 2, (dims["batch"], dims["sequence"]), generator=g)
        ids[:, 0] = cfg.bos_token_id
        ids[:, -1] = cfg.eos_token_id
        return {"input_ids": ids}

    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(
            TensorSpec("last_hidden_state", "float32", ("batch", "sequence", cfg.hidden_size)),
            TensorSpec("pooler_output", "float32", ("batch", pooled_dim)),
        ),
        wrap=_TextEncoder,
        sample=sample,
    )


def unet_spec(unet) -> ComponentSpec:
    cfg = unet.config
    cond_dim = cfg.time_cond_proj_dim
    inputs = [
        TensorSpec("sample", "float32", ("batch", cfg.in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", cfg.cross_attention_dim)),
    ]
    if cond_dim:
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", cond_dim)))

    def sample(dims, g):
        b = dims["batch"]
        feeds = {
            "sample": _randn((b, cfg.in_channels, dims["latent_height"], dims["latent_width"]), g),
            # fractional timesteps must survive export: the time embedding sees floats
            "timestep": torch.rand(b, generator=g) * 999.0,
            "encoder_hidden_states": _randn((b, dims["sequence"], cfg.cross_attention_dim), g),
        }
        if cond_dim:
            feeds["timestep_cond"] = _randn((b, cond_dim), g)
        return feeds

    return ComponentSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_sample", "float32", ("batch", cfg.out_channels, "latent_height", "latent_width")),),
        wrap=lambda m: _UNet(m, with_cond=bool(cond_dim)),
        sample=sample,
    )


def vae_decoder_spec(vae) -> ComponentSpec:
    cfg = vae.config

    def sample(dims, g):
        return {"latent_sample": _randn((dims["batch"], cfg.latent_channels, dims["latent_height"], dims["latent_width"]), g)}

    return ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent_sample", "float32", ("batch", cfg.latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("sample", "float32", ("batch", cfg.out_channels, "height", "width")),),
        wrap=_VaeDecoder,
        sample=sample,
    )


def vae_encoder_spec(vae) -> ComponentSpec:
    cfg = vae.config

    def sample(dims, g):
        return {"sample": torch.rand(dims["batch"], cfg.in_channels, dims["height"], dims["width"], generator=g) * 2 - 1}

    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", cfg.in_channels, "height", "width")),),
        outputs=(
            TensorSpec("latent_parameters", "float32", ("batch", 2 * cfg.latent_channels, "latent_height", "latent_width")),
        ),
        wrap=_VaeEncoder,
        sample=sample,
    )


class _TinyVaeDecoder(torch.nn.Module):
    """AutoencoderTiny (TAESD) as the bundle's decoder. The runtime hands every decoder the full VAE's unscaled
    latents (latents / scaling_factor + shift_factor, from the manifest); diffusers hands a tiny VAE the sampler's
    latents divided by the tiny VAE's own factor. The conversion between the two is baked into the graph, so the
    manifest keeps one latent space and the runtime does not know which decoder it runs."""

    def __init__(self, tiny, scaling_factor: float, shift_factor: float):
        super().__init__()
        self.tiny = tiny
        self.scale = scaling_factor / tiny.config.scaling_factor
        self.shift = shift_factor

    def forward(self, latent_sample):
        return (self.tiny.decode((latent_sample - self.shift) * self.scale, return_dict=False)[0],)


def tiny_vae_decoder_spec(tiny, scaling_factor: float, shift_factor: float) -> ComponentSpec:
    spec = vae_decoder_spec(tiny)
    return ComponentSpec(spec.name, spec.inputs, spec.outputs,
                         wrap=lambda m: _TinyVaeDecoder(m, scaling_factor, shift_factor), sample=spec.sample)
