"""What `edgediff info` says about a bundle: its manifest, readably, and the licence to check before use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .bundle import UNKNOWN_LICENCE, Manifest, Provenance
from .lora_format import LoraSpec, as_spec
from .runtime import graph_cache


def describe_bundle(bundle: Path, manifest: Manifest) -> list[str]:
    """`edgediff info`'s lines for a bundle."""
    defaults, latent = manifest.defaults, manifest.latent
    shift = f", shift {latent.shift_factor:g}" if latent.shift_factor else ""
    lines = [
        f"{bundle}: {manifest.family}, preset {manifest.preset}, {manifest.prediction_type} prediction",
        f"  defaults: {defaults.sampler} ({defaults.schedule}), {defaults.steps} steps, "
        f"guidance {defaults.guidance_scale:g}, {defaults.width}x{defaults.height}",
        _schedule_line(manifest),
        f"  latents: {latent.channels} channels, 1/{latent.downscale} scale, factor {latent.scaling_factor:g}"
        f"{shift}; sizes in multiples of {manifest.size_multiple} px",
    ]
    if manifest.transformer is not None:
        t = manifest.transformer
        guidance = ("guidance as an input (distilled), no CFG batch" if t.guidance_embeds else
                    "no guidance input" if manifest.family == "flux" else "batched CFG with negative prompts")
        lines.append(f"  transformer: {t.max_sequence_length} T5 tokens, text width {t.joint_attention_dim}, "
                     f"{guidance}")
    for encoder in manifest.text_encoders:
        if manifest.transformer is not None and not encoder.pooled_output:
            lines.append(f"  text: {encoder.component} ({encoder.tokenizer}) T5 last_hidden_state")
            continue
        norm = " + final layer norm" if encoder.final_layer_norm else ""
        skip = f", clip skip {encoder.clip_skip}" if encoder.clip_skip else ""
        pooled = f", pooled {encoder.pooled_output}" if encoder.pooled_output else ""
        lines.append(f"  text: {encoder.component} ({encoder.tokenizer}) "
                     f"hidden_states[{encoder.layer}]{norm}{skip}{pooled}")
    if manifest.guidance_embedding_dim:
        lines.append(f"  guidance: LCM embedding ({manifest.guidance_embedding_dim} dims) instead of CFG")
    for name, component in manifest.components.items():
        size = sum(f.size for f in component.files)
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in component.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in component.outputs)
        parity = f", parity {component.parity.max_abs_err:.2g}" if component.parity else ""
        lines += [f"  {name}: {component.precision}, {size / 1e6:.1f} MB{parity}",
                  f"    in:  {ins}", f"    out: {outs}"]
        if component.lora_map:
            lines.append(f"    run-time LoRA: layers mapped in {component.lora_map}")
        cached = graph_cache.cached_graphs((bundle / component.file).parent)
        if cached:
            where = Path(component.file).parent / graph_cache.CACHE_FOLDER
            lines.append(f"    optimised for {len(cached)} machine(s) ({', '.join(cached)}): "
                         f"{sum(cached.values()) / 1e6:.1f} MB in {where} (re-made on the next load if deleted)")
        lines += _engine_lines(bundle, manifest, name)
    provenance = manifest.provenance
    if provenance.description:
        lines.append(f"  about: {provenance.description}")
    lines.append(f"  made from {provenance.source} on {provenance.date}, opset {provenance.opset}, "
                 f"edgediff {provenance.versions.get('edgediff')}")
    lines.append(f"  {licence_line(provenance)}")
    return lines


def _schedule_line(manifest: Manifest) -> str:
    s = manifest.scheduler
    source = f"(from {s.source_class or 'unknown'})"
    if manifest.prediction_type != "flow":
        return (f"  schedule: {s.beta_schedule} betas {s.beta_start:g}..{s.beta_end:g} over {s.num_train_timesteps}, "
                f"{s.timestep_spacing} spacing {source}")
    if s.use_dynamic_shifting:
        return (f"  schedule: flow matching, shift by image size (mu {s.base_shift:g}..{s.max_shift:g} over "
                f"{s.base_image_seq_len}..{s.max_image_seq_len} latent tokens) {source}")
    return f"  schedule: flow matching, shift {s.shift:g} {source}"


def _engine_lines(bundle: Path, manifest: Manifest, name: str) -> list[str]:
    """The TensorRT engines built for a component (`edgediff build`), wherever they live."""
    from .runtime import engines

    found = engines.engines_for(bundle, manifest, name)
    return [f"    TensorRT engine: {path.name}, {entry.precision}, {entry.machine.label}, "
            f"{path.stat().st_size / 1e6 if path.is_file() else 0:.1f} MB, profile "
            f"{engines.describe_profiles([entry])}" for path, entry in found]


def licence_line(provenance: Provenance) -> str:
    """The source's licence as `info` shows it: users must check it before commercial use."""
    if provenance.licence == UNKNOWN_LICENCE:
        return "licence: unknown — check the source's terms before commercial use"
    source = f" (from {provenance.licence_from})" if provenance.licence_from else ""
    return f"licence: {provenance.licence}{source}"


ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def describe_runtime() -> list[str]:
    """`edgediff info`'s lines on what renders here: the onnxruntime distribution(s) installed (onnxruntime and
    onnxruntime-gpu install the same module, so two of them means whichever went last won), its execution
    providers, and which backends can start."""
    from importlib import metadata

    import onnxruntime

    from .runtime.backends import BACKENDS
    from .runtime.backends import ort as ort_backends

    installed = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    shown = ", ".join(f"{n} {v}" for n, v in installed.items()) or "none found (a source build?)"
    lines = ["runtime:", f"  onnxruntime {onnxruntime.__version__}, from the distribution {shown}"]
    if len(installed) > 1:
        lines.append("  warning: both distributions are installed and share one module; keep one: "
                     "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    providers = onnxruntime.get_available_providers()
    lines.append(f"  providers: {', '.join(providers)}")
    needs = {cls.backend: cls.provider for cls in (ort_backends.OrtCpuSession, ort_backends.OrtCudaSession,
                                                   ort_backends.OrtTensorrtSession)}
    for name in BACKENDS:
        provider = needs.get(name)
        if provider is None:
            state = "not an onnxruntime backend (it checks its own libraries when opened)"
        elif provider in providers:
            state = f"{provider} present (its CUDA/TensorRT libraries load at the first render)" \
                if provider != "CPUExecutionProvider" else "ready"
        else:
            state = f"needs {provider}, which this onnxruntime lacks"
        lines.append(f"  backend {name}: {state}")
    return lines


def describe_samplers() -> list[str]:
    """`edgediff samplers`: the samplers, schedules and presets, one line each."""
    from .runtime.sampler_catalogue import PRESETS, SAMPLERS
    from .runtime.schedules import DISCRETE, SCHEDULES

    lines = ["samplers (--sampler; in brackets the schedules each runs on, its default first):"]
    for name, info in SAMPLERS.items():
        names = [n for n in info.schedules if n not in DISCRETE]
        if set(DISCRETE) <= set(info.schedules):
            names.insert(0, "discrete + spacings")
        lines.append(f"  {name:<13} {info.description} [{', '.join(names)}]")
    lines.append("schedules (--schedule):")
    lines += [f"  {name:<13} {description}" for name, description in SCHEDULES.items()]
    lines.append("presets (from the bundle's manifest, used when no sampler or schedule is given):")
    lines += [f"  {name:<13} {p.sampler}, {p.schedule}: {p.description}" for name, p in PRESETS.items()]
    return lines


def describe_loras(bundle: Path, manifest: Manifest, loras: Sequence[LoraSpec]) -> list[str]:
    """`edgediff info --lora`: which components and how many layers of this bundle each LoRA changes at run time;
    LoraError (one line) for one the bundle cannot take."""
    from .runtime.lora import match_layers, read_lora

    lines = []
    for spec in loras:
        lora = read_lora(*as_spec(spec))
        touched = match_layers(bundle, manifest, [lora])
        ranks = sorted({int(layer["down"].shape[0]) for found in lora.layers.values() for layer in found.values()})
        counts = ", ".join(f"{c} {len(layers)} layers" for c, layers in touched.items())
        unused = sum(1 for layers in touched.values() for layer in layers if not layer.mapped.parts)
        lines.append(f"LoRA {lora.path.name} ({lora.format} keys, rank {'/'.join(map(str, ranks))}): {counts}"
                     + (f" ({unused} of them unused by the exported graphs)" if unused else ""))
    return lines
