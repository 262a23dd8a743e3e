"""SD3 / SD3.5 and FLUX.1 checkpoints: MMDiT transformers sampled by flow matching, conditioned on CLIP and T5.

What differs from the U-Net families at export, as diffusers' StableDiffusion3Pipeline and FluxPipeline use each
component: which hidden state and pooled output each text encoder gives, T5's token count, the flow-matching
schedule's shift, the presets' steps and guidance. Options not yet carried over to these families are refused
here, in one line, before any export work.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..bundle import Defaults, SchedulerConfig, TextEncoder, TransformerConditions

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
T5_COMPONENT = {"sd3": "text_encoder_3", "flux": "text_encoder_2"}
# T5 tokens, as diffusers' pipelines and the model cards use them: SD3 256; FLUX.1-dev 512, FLUX.1-schnell (the
# transformer without a guidance embedding) 256
SD3_SEQUENCE, FLUX_DEV_SEQUENCE, FLUX_SCHNELL_SEQUENCE = 256, 512, 256
# preset -> (steps, guidance): diffusers' pipeline defaults for the base models (SD3: 28 steps, CFG 7.0; FLUX.1-dev:
# 28 steps, guidance embedding 3.5); "turbo" for the distilled ones (FLUX.1-schnell, SD3.5 Large Turbo: 4 steps,
# no guidance)
FLOW_PRESETS = {"standard": {"sd3": (28, 7.0), "flux": (28, 3.5)}, "turbo": {"sd3": (4, 0.0), "flux": (4, 0.0)}}
SCHEDULER_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
                  "max_image_seq_len")


def _error(message: str) -> Exception:
    from .checkpoint import SourceError  # checkpoint.py imports this module

    return SourceError(message)


@dataclasses.dataclass(frozen=True)
class FlowCheckpoint:
    ck: Checkpoint

    @property
    def config(self) -> dict:
        assert self.ck.transformer_config is not None
        return self.ck.transformer_config

    @property
    def family(self) -> str:
        cls = self.ck.index["transformer"][1]
        family = TRANSFORMERS.get(cls)
        if family is None:
            raise _error(f"{self.ck.root}: transformer {cls}; edgediff exports {', '.join(TRANSFORMERS)}")
        return family

    @property
    def t5(self) -> str | None:
        """T5's component name, or None for an SD3 pipeline saved without it (diffusers then feeds zeros)."""
        name = T5_COMPONENT[self.family]
        entry = self.ck.index.get(name)
        present = isinstance(entry, list) and bool(entry) and entry[0] is not None
        if not present and self.family == "flux":
            raise _error(f"{self.ck.root}: a FLUX pipeline without its T5 encoder ({name}); FLUX needs it")
        return name if present else None

    @property
    def guidance_embeds(self) -> bool:
        return self.family == "flux" and bool(self.config.get("guidance_embeds"))

    @property
    def default_preset(self) -> str:
        # FLUX.1-schnell is FLUX.1-dev's transformer without the guidance embedding, distilled for 1-4 steps
        return "turbo" if self.family == "flux" and not self.guidance_embeds else "standard"

    def check_preset(self, preset: str) -> None:
        if preset not in FLOW_PRESETS:
            raise _error(f"--preset {preset}: not for {self.family} models; choose one of {', '.join(FLOW_PRESETS)}")

    def max_sequence_length(self) -> int:
        if self.family == "sd3":
            return SD3_SEQUENCE
        return FLUX_DEV_SEQUENCE if self.guidance_embeds else FLUX_SCHNELL_SEQUENCE

    def conditions(self) -> TransformerConditions:
        # SD3's learned position embedding covers pos_embed_max_size patches a side, cropped to the render's;
        # FLUX's rotary one takes any size
        reach = self.config.get("pos_embed_max_size") if self.family == "sd3" else None
        patch = int(self.config.get("patch_size", 2))
        return TransformerConditions(max_sequence_length=self.max_sequence_length(),
                                     joint_attention_dim=int(self.config["joint_attention_dim"]),
                                     guidance_embeds=self.guidance_embeds,
                                     max_side=int(reach) * patch * self.ck.latent.downscale if reach else None)

    def tokenizer_lengths(self) -> dict[str, int]:
        """Tokenizer folder -> the length it pads and truncates to, where not the tokenizer's own (T5's)."""
        t5 = self.t5
        return {} if t5 is None else {_tokenizer_of(t5): self.max_sequence_length()}

    def text_encoders(self, clip_skip: int) -> tuple[TextEncoder, ...]:
        """SD3: CLIP-L and CLIP-G each give hidden_states[-(clip_skip + 2)] without the final norm and their
        projected pooled output (text_embeds), T5 its last hidden state. FLUX: CLIP-L's pooler_output only (its
        hidden state is not used), T5's last hidden state."""
        t5 = self.t5
        t5_record = () if t5 is None else (TextEncoder(component=t5, tokenizer=_tokenizer_of(t5)),)
        if self.family == "flux":
            if clip_skip:
                raise _error("--clip-skip: FLUX takes only CLIP's pooled output, which no layer choice changes")
            return (TextEncoder(pooled_output="pooler_output"), *t5_record)
        layers = min(int(c.get("num_hidden_layers", 12)) for c in (self.ck.text_config, self.ck.text_config_2 or {}))
        if not 0 <= clip_skip <= layers - 2:
            raise _error(f"--clip-skip {clip_skip}: this model's text encoders have {layers} layers; choose 0 to "
                         f"{layers - 2}")
        clips = tuple(TextEncoder(component=name, tokenizer=_tokenizer_of(name), output="hidden_state",
                                  layer=-(clip_skip + 2), final_layer_norm=False, clip_skip=clip_skip,
                                  pooled_output="text_embeds")
                      for name in ("text_encoder", "text_encoder_2"))
        return clips + t5_record

    def scheduler(self) -> tuple[SchedulerConfig, str]:
        """FlowMatchEulerDiscreteScheduler's config with its defaults filled in, and the prediction type."""
        import diffusers

        raw = self.ck.scheduler_config
        if raw.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise _error(f"{self.ck.root}: scheduler {raw.get('_class_name')!r}; {self.family} models export with "
                         "FlowMatchEulerDiscreteScheduler")
        full = dict(diffusers.FlowMatchEulerDiscreteScheduler.from_config(raw).config)
        unsupported = [k for k in ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "stochastic_sampling") if full.get(k)]
        if full.get("time_shift_type", "exponential") != "exponential":
            unsupported.append("time_shift_type")
        if self.family == "sd3" and full.get("use_dynamic_shifting"):
            unsupported.append("use_dynamic_shifting (for SD3)")
        if unsupported:
            raise _error(f"{self.ck.root}: the scheduler config sets {', '.join(unsupported)}, which edgediff's "
                         "flow_euler does not follow yet")
        values = {k: full[k] for k in SCHEDULER_KEYS if full.get(k) is not None}
        config = SchedulerConfig(num_train_timesteps=int(full.get("num_train_timesteps", 1000)),
                                 source_class=raw["_class_name"], **values)
        return config, "flow"

    def defaults(self, preset: str) -> Defaults:
        steps, guidance = FLOW_PRESETS[preset][self.family]
        if self.family == "flux" and not self.guidance_embeds:
            guidance = 0.0  # schnell has no guidance input at all
        side = int(self.config.get("sample_size", 128)) * self.ck.latent.downscale
        if self.family == "flux":
            side = 1024  # FluxPipeline's default_sample_size 128 latents; the transformer's config has no size
        schedule = "flow_dynamic" if self.family == "flux" else "flow_shift"
        return Defaults(sampler="flow_euler", schedule=schedule, steps=steps, guidance_scale=guidance, height=side,
                        width=side)


def _tokenizer_of(component: str) -> str:
    return component.replace("text_encoder", "tokenizer")


def refuse_options(family: str, *, loras: tuple, tiny_vae: object) -> None:
    """What this edgediff does not yet do for SD3 / FLUX bundles: one line each, before any export work."""
    if loras:
        raise _error(f"--lora: not yet for {family} bundles (LoRA fusion covers U-Net families only)")
    if tiny_vae is not None:
        raise _error(f"--tiny-vae: not yet for {family} bundles (the decoder must take its 16-channel latents)")
