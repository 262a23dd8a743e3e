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
    """Outputs the hidden state the U-Net is conditioned on, so the runtime never picks layers: hidden_states[layer],
    through the final layer norm where the source pipeline applies it (SD's clip skip does, SDXL does not)."""

    def __init__(self, model, layer: int, final_layer_norm: bool):
        super().__init__()
        self.model = model
        self.layer = layer
        self.final_layer_norm = final_layer_norm

    def forward(self, input_ids):
        last = self.layer == -1 and self.final_layer_norm
        out = self.model(input_ids=input_ids, output_hidden_states=not last, return_dict=True)
        # CLIPTextModelWithProjection's first output is its projected pooled embedding (text_embeds)
        pooled = out[0] if hasattr(self.model, "text_projection") else out.pooler_output
        if last:
            return out.last_hidden_state, pooled
        hidden = out.hidden_states[self.layer]
        if self.final_layer_norm:
            # transformers 5 flattened CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps it
            hidden = getattr(self.model, "text_model", self.model).final_layer_norm(hidden)
        return hidden, pooled


class _SplitGEGLU(torch.nn.Module):
    """diffusers' GEGLU with its projection split into two linears, value and gate: the same products, but the
    graph has no Slice copying the double-width projection output into halves (2.5 % of the full-size SD-Turbo
    U-Net step on the CPU, int8 and fp32 alike)."""

    source_name = "proj"  # the linear it replaces, as LoRA files and the LoRA map name it

    def __init__(self, geglu):
        super().__init__()
        proj = geglu.proj
        inner = proj.out_features // 2
        self.value, self.gate = (self._linear(proj, rows) for rows in (slice(0, inner), slice(inner, None)))

    @staticmethod
    def _linear(proj: torch.nn.Linear, rows: slice) -> torch.nn.Linear:
        weight = proj.weight[rows].detach().clone()
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=proj.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if proj.bias is not None:
            linear.bias = torch.nn.Parameter(proj.bias[rows].detach().clone(), requires_grad=False)
        return linear

    def source_parts(self) -> tuple[tuple[str, torch.nn.Linear, int], ...]:
        """(child name, linear, first row of the source projection it holds), for the LoRA map."""
        return ("value", self.value, 0), ("gate", self.gate, self.value.out_features)

    def forward(self, hidden_states, *args, **kwargs):
        return self.value(hidden_states) * torch.nn.functional.gelu(self.gate(hidden_states))


def split_gated_linears(model: torch.nn.Module) -> int:
    """Replace every diffusers GEGLU in `model` by its _SplitGEGLU twin (in place); returns how many."""
    from diffusers.models.activations import GEGLU

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is GEGLU]
    for parent, name, child in swaps:
        parent._modules[name] = _SplitGEGLU(child)
    return len(swaps)


class _UNet(torch.nn.Module):
    """Positional inputs in spec order; SDXL's `text_embeds` and `time_ids` become diffusers' added_cond_kwargs.
    The U-Net's GEGLUs are split in place (the exporter loaded it, nothing else holds it), so the parity gate
    runs the very module that was traced."""

    def __init__(self, unet, names: tuple[str, ...]):
        super().__init__()
        split_gated_linears(unet)
        self.unet = unet
        self.names = names

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        extra = dict(zip(self.names[3:], rest))
        added = {k: extra[k] for k in ("text_embeds", "time_ids") if k in extra}
        return (
            self.unet(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                timestep_cond=extra.get("timestep_cond"),
                added_cond_kwargs=added or None,
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


# The log-variance a tiny VAE's encoder is given (its latents are deterministic): the runtime clips it to -30
# as diffusers does, so it samples mean + 3e-7 * noise, where diffusers takes AutoencoderTiny's latents as they are.
TINY_ENCODER_LOGVAR = -30.0


class _TinyVaeEncoder(torch.nn.Module):
    """AutoencoderTiny (SDXS and other checkpoints that ship TAESD as their own VAE) in the encoder's place. Its
    latents are deterministic; they are stacked with a constant log-variance so that the bundle keeps one encoder
    signature and the runtime samples from them as from any VAE's moments."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        latents = self.vae.encode(sample, return_dict=False)[0]
        return (torch.cat([latents, torch.full_like(latents, TINY_ENCODER_LOGVAR)], dim=1),)


def _is_tiny(vae) -> bool:
    return type(vae).__name__ == "AutoencoderTiny"


def _randn(shape, g):
    return torch.randn(*shape, generator=g)


def text_encoder_spec(
    model, name: str = "text_encoder", layer: int = -1, final_layer_norm: bool = True
) -> ComponentSpec:
    """`layer` and `final_layer_norm` choose the hidden state the graph outputs (see _TextEncoder); the output is
    called last_hidden_state only when it is that, else hidden_state."""
    cfg = model.config
    projected = hasattr(model, "text_projection")
    pooled_dim = cfg.projection_dim if projected else cfg.hidden_size
    hidden_name = "last_hidden_state" if layer == -1 and final_layer_norm else "hidden_state"

    def sample(dims, g):
        ids = torch.randint(0, cfg.vocab_size - 2, (dims["batch"], dims["sequence"]), generator=g)
        ids[:, 0] = cfg.bos_token_id
        ids[:, -1] = cfg.eos_token_id
        return {"input_ids": ids}

    return ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(
            TensorSpec(hidden_name, "float32", ("batch", "sequence", cfg.hidden_size)),
            TensorSpec("text_embeds" if projected else "pooler_output", "float32", ("batch", pooled_dim)),
        ),
        wrap=lambda m: _TextEncoder(m, layer, final_layer_norm),
        sample=sample,
    )


def unet_spec(unet) -> ComponentSpec:
    cfg = unet.config
    cond_dim = cfg.time_cond_proj_dim
    sdxl = cfg.addition_embed_type == "text_time"
    inputs = [
        TensorSpec("sample", "float32", ("batch", cfg.in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", cfg.cross_attention_dim)),
    ]
    if sdxl:
        # the pooled width is what the added embedding takes beyond its 6 sinusoidally embedded time ids
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),
                   TensorSpec("time_ids", "float32", ("batch", 6))]
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
        if sdxl:
            feeds["text_embeds"] = _randn((b, pooled_dim), g)
            # sizes and crops in pixels, as renders feed them
            feeds["time_ids"] = torch.randint(0, 1025, (b, 6), generator=g).float()
        if cond_dim:
            feeds["timestep_cond"] = _randn((b, cond_dim), g)
        return feeds

    names = tuple(t.name for t in inputs)
    return ComponentSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("out_sample", "float32", ("batch", cfg.out_channels, "latent_height", "latent_width")),),
        wrap=lambda m: _UNet(m, names),
        sample=sample,
    )


def vae_decoder_spec(vae) -> ComponentSpec:
    cfg = vae.config

    def sample(dims, g):
        return {
            "latent_sample": _randn(
                (dims["batch"], cfg.latent_channels, dims["latent_height"], dims["latent_width"]), g
            )
        }

    return ComponentSpec(
        name="vae_decoder",
        inputs=(
            TensorSpec("latent_sample", "float32", ("batch", cfg.latent_channels, "latent_height", "latent_width")),
        ),
        outputs=(TensorSpec("sample", "float32", ("batch", cfg.out_channels, "height", "width")),),
        wrap=_VaeDecoder,
        sample=sample,
    )


def vae_encoder_spec(vae) -> ComponentSpec:
    cfg = vae.config

    def sample(dims, g):
        return {
            "sample": torch.rand(dims["batch"], cfg.in_channels, dims["height"], dims["width"], generator=g) * 2 - 1
        }

    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("sample", "float32", ("batch", cfg.in_channels, "height", "width")),),
        outputs=(
            TensorSpec(
                "latent_parameters", "float32", ("batch", 2 * cfg.latent_channels, "latent_height", "latent_width")
            ),
        ),
        wrap=_TinyVaeEncoder if _is_tiny(vae) else _VaeEncoder,
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
