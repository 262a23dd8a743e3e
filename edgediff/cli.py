"""The `edgediff` command: render, export, build, info, samplers, bench (serve and batch: cli_serve.py). Thin:
parse, call the library, show progress.

Bad input (a missing bundle, a size the model cannot take, an unreadable image…) gets one line on stderr and exit
code 2, with nothing written.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .cli_options import (
    USAGE_ERROR,
    Commands,
    Named,
    described,
    lora_option,
    one_line_errors,
    parse_size,
    png_parameters,
)
from .cli_serve import batch, serve
from .export import PRECISIONS
from .runtime.backends import BACKENDS
from .runtime.noise import NOISE_KINDS
from .runtime.pipeline import MEMORY_MODES, VAE_TILING
from .runtime.sampler_catalogue import PRESETS, SAMPLERS
from .runtime.schedules import SCHEDULES


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgediff")
def main():
    """edgediff: fast text-to-image diffusion on ONNX Runtime, no PyTorch at run time.

    Export a diffusers checkpoint once (`edgediff export`), then render from the bundle (`edgediff render`)."""


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", "bundle", type=click.Path(path_type=Path),
              help="Bundle folder written by `edgediff export` [default: the built-in model].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("out.png"), show_default=True,
              help="PNG to write; with several images, NAME-1.png, NAME-2.png, …")
@click.option("--steps", type=int, help="Denoising steps [default: the bundle's, e.g. 1 for Turbo, 4 for LCM].")
@click.option(
    "--guidance", type=float, help="Guidance scale; ≤ 1 turns classifier-free guidance off [default: the bundle's]."
)
@click.option("--negative", default=None, help="Negative prompt: what the image should not show.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed; matches diffusers' torch CPU generator.")
@click.option("--size", callback=parse_size, help="WIDTHxHEIGHT in pixels [default: the bundle's].")
@click.option("--sampler", type=Named("sampler", SAMPLERS),
              help="Sampler (`edgediff samplers` says what each is) [default: the bundle's].")
@click.option("--schedule", type=Named("schedule", SCHEDULES),
              help="Sigma schedule [default: the bundle preset's, else the sampler's own].")
@click.option("--eta", type=float, help="ddim: stochasticity, 0 deterministic to 1 DDPM-like [default: 0]; tcd: its "
              "gamma [default: 0.3]. Other samplers take none.")
@click.option("--true-cfg", type=float, help="FLUX: true CFG scale; above 1 the negative prompt is used (two model "
              "calls a step) [default: off].")
@click.option("--noise", type=Named("noise source", NOISE_KINDS), default=next(iter(NOISE_KINDS)), show_default=True,
              help=described(NOISE_KINDS) + ".")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images to render for the prompt.")
@click.option("--image", "init_image", type=click.Path(path_type=Path), help="Init image for image-to-image.")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="Image-to-image: how much of the init image to repaint (0..1].")
@click.option("--backend", type=click.Choice(list(BACKENDS)), default="cpu", show_default=True,
              help="Where the models run: " + "; ".join(f"{b.name}: {b.description}" for b in BACKENDS.values()) + ".")
@click.option("--threads", type=int, help="Intra-op threads [default: ONNX Runtime's choice].")
@click.option("--memory", type=Named("memory mode", MEMORY_MODES), default=MEMORY_MODES[0], show_default=True,
              help="low: load each component only for its stage, so peak memory is about the largest one.")
@click.option("--vae-tiling", type=Named("VAE tiling", VAE_TILING), default=VAE_TILING[0], show_default=True,
              help="Decode (and encode) in overlapping tiles so the VAE's memory is one tile's; auto: from 4x the "
              "model's native pixel count, or where the whole image would not fit in memory.")
@click.option("--verify", is_flag=True, help="Hash every bundle file in full before rendering (slow on big bundles; "
              "by default each file's size and a 16-chunk fingerprint are checked).")
@click.option("--allow-symlinks", is_flag=True, help="Load a bundle whose files are symbolic links to elsewhere "
              "(a hub cache's layout) [default: refused].")
@lora_option("A LoRA (.safetensors, diffusers or kohya keys) added to the weights at load, at SCALE [default: 1]; "
             "repeatable. The bundle is not changed; it needs LoRA maps (exported by this edgediff).")
def render(prompt, bundle, output, steps, guidance, negative, seed, size, sampler, num_images, init_image, strength,
           backend, threads, memory, schedule, noise, eta, true_cfg, verify, allow_symlinks, vae_tiling, loras):
    """Render PROMPT to a PNG that carries its generation parameters."""
    from tqdm import tqdm

    from .runtime.images import check_png_targets, save_pngs
    from .runtime.pipeline import Pipeline
    from .runtime.plan import checked_threads
    from .runtime.prompts import printable

    with one_line_errors():
        from .runtime.plan import MAX_IMAGES, RenderError

        if not 1 <= num_images <= MAX_IMAGES:
            raise RenderError(f"--num-images must be 1 to {MAX_IMAGES}, got {num_images}")
        paths = [output] if num_images == 1 else [
            output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(num_images)
        ] if output.name else [output]
        check_png_targets(paths)  # before the (slow) load and render
        _check_sampling_names(sampler, schedule, eta)
        checked_threads(threads)
        pipe = Pipeline.load(bundle, backend=backend, threads=threads, memory=memory, vae_tiling=vae_tiling,
                             verify="full" if verify else "fast", allow_symlinks=allow_symlinks, loras=loras)
        if pipe.lora_switch is not None:
            click.echo(pipe.lora_switch.describe(), err=True)
        bar = None

        def progress(step, total, latents):
            nonlocal bar
            if bar is None:
                # disable=None: a bar on a terminal only, not in logs or captured stderr
                bar = tqdm(total=total, desc="denoising", unit="step", leave=False, disable=None)
            bar.update(1)

        width, height = size if size else (None, None)
        out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                   height=height, width=width, num_images_per_prompt=num_images, seed=seed, sampler=sampler,
                   image=init_image, strength=strength, callback=progress, schedule=schedule, noise=noise,
                   eta=eta, true_cfg_scale=true_cfg)
        if bar is not None:
            bar.close()
    for w in out.warnings:
        click.echo(f"warning: {printable(w)}", err=True)
    params = png_parameters(printable(prompt), printable(negative) if negative else None, out.plan, pipe.root)
    with one_line_errors():
        save_pngs(out.images, paths, params)  # all the images or none: a full disk midway leaves no partial set
    for path in paths:
        click.echo(str(path))
    click.echo(f"{out.timings['total']:.2f} s ({len(out.timings['steps'])} steps)", err=True)


def _check_sampling_names(sampler, schedule, eta=None) -> None:
    from .bundle import SchedulerConfig
    from .runtime.pipeline import RenderError
    from .runtime.sampler_catalogue import resolve, sampler_options
    from .runtime.schedules import SCHEDULES

    try:
        if sampler is not None:
            resolve(sampler, schedule)
            sampler_options(sampler, SchedulerConfig(), eta)
        elif schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    except ValueError as e:
        raise RenderError(str(e)) from None


@main.command()
def samplers():
    """List the samplers, schedules and distilled-model presets, one line each."""
    from .describe import describe_samplers

    click.echo("\n".join(describe_samplers()))


@contextmanager
def _stopped_by_signals(out):
    """SIGTERM (`timeout`, `kill`, a container stopping) ends an export as Ctrl-C does: by an exception, so the
    atomic write removes its partial folder and the lock is let go. Without this the default action kills the
    process on the spot and leaves a partial bundle (gigabytes, for a full-size int8 export)."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        click.echo(f"error: export stopped ({e or 'SIGINT'}); {out} was not written", err=True)
        sys.exit(128 + (signal.SIGTERM if str(e) == "SIGTERM" else signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=Named("preset", PRESETS),
              help="Sampling defaults for a distilled model when its config cannot tell (e.g. turbo for SD-Turbo): "
              + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()) + ".")
@click.option("--force", is_flag=True, help="Replace OUT if it is an edgediff bundle (or an empty folder).")
@click.option("--opset", type=int, default=17, show_default=True,
              help="ONNX opset: 17 to the newest the installed torch exporter supports.")
@click.option("--precision", type=Named("precision", PRECISIONS), default=next(iter(PRECISIONS)), show_default=True,
              help=described(PRECISIONS) + ".")
@click.option("--calibration-prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="int8: a text file of calibration prompts, one a line (the last one only gates) "
              "[default: a built-in set of 8].")
@click.option("--calibration-steps", type=click.IntRange(1), help="int8: steps per calibration render "
              "[default: the bundle's, 2..8].")
@click.option("--calibration-size", type=click.IntRange(1), help="int8: side of the square calibration renders "
              "in pixels [default: the bundle's size].")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="A LoRA (.safetensors, diffusers or kohya keys) fused into the weights before export, at SCALE "
              "[default: 1]; repeatable, fused in order.")
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt / .bin / .pt weights (pickles can run code as they "
              "load: only for files you trust).")
@click.option("--tiny-vae", type=click.Path(path_type=Path), help="An AutoencoderTiny folder (TAESD, TAESDXL) "
              "exported as the decoder instead of the full VAE: fast previews, small devices.")
@click.option("--clip-skip", type=click.IntRange(0), default=0, show_default=True,
              help="Condition on the text encoder's hidden state N layers before the one the model takes, as "
              "diffusers' clip_skip=N (baked into the exported text encoder and recorded in the manifest).")
@click.option("--license", "licence", metavar="TEXT", help="The source model's licence, recorded in the manifest "
              "[default: the license field of the source's model card (README.md), else unknown].")
def export(src, out, preset, force, opset, precision, calibration_prompts, calibration_steps, calibration_size,
           loras, allow_pickle, tiny_vae, clip_skip, licence):
    """Export SRC (a diffusers checkpoint folder, a hub id, or a single-file checkpoint) to an ONNX bundle OUT.

    Each component is exported, then run on ONNX Runtime against PyTorch on the same inputs; the export fails
    past the stated tolerance. fp16 and int8 components are then held to the fp32 graph with their own stated
    tolerances. OUT appears only when everything succeeded."""
    try:
        from .export.calibrate import Calibration
        from .export.checkpoint import SourceError
        from .export.convert import export_bundle
        from .export.gate import ParityError
    except ImportError as e:
        click.echo(
            f"error: export needs the export extra ({e.name} is missing); pip install 'edgediff[export]'", err=True
        )
        sys.exit(USAGE_ERROR)
    from tqdm import tqdm

    calibration = None
    if calibration_prompts or calibration_steps or calibration_size:
        prompts = Calibration.prompts
        if calibration_prompts:
            prompts = tuple(line.strip() for line in calibration_prompts.read_text().splitlines() if line.strip())
        if len(prompts) < 2:
            click.echo(f"error: {calibration_prompts}: give at least 2 prompts (the last one only gates)", err=True)
            sys.exit(USAGE_ERROR)
        calibration = Calibration(prompts=prompts, steps=calibration_steps, size=calibration_size)
    with _stopped_by_signals(out), one_line_errors(SourceError, ParityError), \
            tqdm(desc="export", unit="component", delay=0.5) as bar:
        def progress(name, done, total):
            bar.total = total
            bar.set_postfix_str(f"{name} proven")
            bar.update(done - bar.n)

        phases: dict = {}

        def phase(what, done, total):  # a second bar for a long step within a component (int8 calibration, ...)
            if what not in phases:
                phases[what] = tqdm(desc=f"  {what}", total=total, leave=False, position=1)
            phases[what].update(done - phases[what].n)
            if done >= total:
                phases.pop(what).close()

        manifest = export_bundle(src, out, preset=preset, force=force, opset=opset, precision=precision,
                                 calibration=calibration, loras=loras, allow_pickle=allow_pickle, tiny_vae=tiny_vae,
                                 clip_skip=clip_skip, progress=progress, license=licence, phase=phase)
    click.echo(f"{out}: {manifest.family} ({manifest.preset}), {len(manifest.components)} components")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--size", callback=parse_size, help="WIDTHxHEIGHT: static engines for this one size (steps replay "
              "as a CUDA graph) [default: the bundle's size ranges].")
@click.option("--min-size", callback=parse_size, help="WIDTHxHEIGHT: the smallest size of a dynamic profile.")
@click.option("--opt-size", callback=parse_size, help="WIDTHxHEIGHT: the size TensorRT tunes for [default: max].")
@click.option("--max-size", callback=parse_size, help="WIDTHxHEIGHT: the largest size of a dynamic profile.")
@click.option("--batch", type=int, help="Images per call, fixed (doubled for the U-Net of a CFG bundle).")
@click.option("--max-batch", type=int, help="Images per call, up to N (doubled for the U-Net of a CFG bundle).")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file to read and "
              "update [default: one per GPU and TensorRT version beside the engines].")
@click.option("--workspace", type=click.FloatRange(min=0, min_open=True), metavar="GB",
              help="TensorRT's workspace limit in GiB [default: TensorRT's].")
@click.option("--weight-streaming", is_flag=True, help="Engines that can stream weights from host memory "
              "(`render --memory low` then keeps only part of them on the GPU).")
def build(bundle, size, min_size, opt_size, max_size, batch, max_batch, timing_cache, workspace, weight_streaming):
    """Build TensorRT engines for BUNDLE on this machine's NVIDIA GPU (render with --backend tensorrt).

    One engine per component, at the bundle's precision, with optimisation profiles from the manifest's ranges
    and the sizes given; kept in BUNDLE/engines/ (the user's cache for a read-only bundle), keyed by GPU,
    TensorRT version, precision and profile. An engine already built with the same key is skipped."""
    from tqdm import tqdm

    from .build.profiles import BuildRequest, precision_line
    from .build.tensorrt import BuildOptions, build_engines
    from .bundle import read_manifest

    with one_line_errors():
        request = BuildRequest.make(size=size, min_size=min_size, opt_size=opt_size, max_size=max_size,
                                    batch=batch, max_batch=max_batch)
        click.echo(precision_line(read_manifest(bundle)))
        options = BuildOptions(request, timing_cache, workspace, weight_streaming)
        with tqdm(desc="build", unit="engine", delay=0.5) as bar:
            def progress(name, done, total, status):
                bar.total = total
                bar.set_postfix_str(f"{name} {status}")
                bar.update(done - bar.n)

            built = build_engines(bundle, options, progress=progress)
    for b in built:
        click.echo(f"{b.component}: {b.path}{' (already built)' if b.skipped else ''}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--verify", is_flag=True, help="Check every file's full sha256 (slow on big bundles).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--runtime", "runtime_only", is_flag=True,
              help="Show only the runtime: the onnxruntime distribution, its providers, the backends.")
@click.option("--allow-symlinks", is_flag=True, help="Accept a bundle whose files are symbolic links to elsewhere.")
@lora_option("A LoRA file: which components and how many layers of BUNDLE it changes at run time (render --lora).")
def info(bundle, verify, as_json, runtime_only, allow_symlinks, loras):
    """Show what BUNDLE is (default: the built-in model): family, sampling defaults, components, signatures.
    With no BUNDLE, the runtime follows: the onnxruntime distribution installed, its providers, the backends."""
    from .bundle import BundleError, load_manifest
    from .describe import describe_bundle, describe_loras, describe_runtime
    from .models import builtin_bundle

    if runtime_only:
        click.echo("\n".join(describe_runtime()))
        return
    with one_line_errors():
        show_runtime = bundle is None
        if bundle is None:
            bundle = builtin_bundle()
            if bundle is None:
                raise BundleError("no bundle given and this install has no built-in model; pass a bundle folder")
        manifest = load_manifest(bundle, verify="full" if verify else "fast", allow_symlinks=allow_symlinks)
        lora_lines = describe_loras(Path(bundle), manifest, loras)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2))
        return
    for line in describe_bundle(Path(bundle), manifest):
        click.echo(line)
    if verify:
        click.echo("  verified: every file's sha256 matches")
    click.echo("\n".join(lora_lines), nl=bool(lora_lines))
    if show_runtime:
        click.echo("\n".join(describe_runtime()))


from . import cli_bench  # noqa: E402,F401  (registers `bench` on main)

main.add_command(serve)
main.add_command(batch)

if __name__ == "__main__":
    main()
