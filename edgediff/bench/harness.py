"""The harness behind `edgediff bench`: engines in their own processes, interleaved run by run, stage by stage.

Every engine (each edgediff bundle, diffusers' PyTorch pipeline, Optimum's ONNX Runtime pipeline) runs in a worker
process of its own, so its load time, first render and peak memory are its own; the measured runs go round the
engines in turn, so that the machine's drift hits all of them alike and ratios hold where absolute times wander.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..bundle import read_manifest
from ..runtime.graph_cache import cpu_features
from ..runtime.plan import uses_cfg
from . import worker
from .flops import count_flops
from .openvino_peer import DEFAULT_OPENVINO_PYTHON, OPENVINO_PEERS, openvino_spec
from .peak import measure_peak

# diffusers: PyTorch fp32 on the CPU; diffusers-cuda: PyTorch fp16 on the GPU (the peer of the GPU backends);
# openvino*: OpenVINO GenAI, fp32 and its two int8 modes (openvino_peer.py)
PEERS = ("diffusers", "diffusers-cuda", "optimum", *OPENVINO_PEERS)
DEFAULT_OPTIMUM_PYTHON = Path("benchmarks/.venv-optimum/bin/python")
STAGES = ("text", "unet", "vae_decoder", "other", "total")


@dataclass
class Settings:
    steps: list[int] = field(default_factory=lambda: [1])
    width: int = 512
    height: int = 512
    batches: list[int] = field(default_factory=lambda: [1])
    threads: int | None = None
    runs: int = 3
    warmup: int = 1
    compare: list[str] = field(default_factory=list)
    memory: str = "normal"
    backends: list[str] = field(default_factory=lambda: ["cpu"])  # edgediff's, each bundle timed on each
    prompt: str = "a photograph of an astronaut riding a horse"
    optimum_python: Path = DEFAULT_OPTIMUM_PYTHON
    optimum_model: Path | None = None
    openvino_python: Path = DEFAULT_OPENVINO_PYTHON
    openvino_model: Path | None = None  # the folder of OpenVINO exports, one sub-folder per variant
    one_at_a_time: bool = False  # each engine loaded, measured and closed before the next (big models)


class EngineError(RuntimeError):
    pass


class EngineProcess:
    """A worker process: send a request line, read a reply line."""

    def __init__(self, label: str, spec: dict, python: str = sys.executable):
        self.label, self.spec = label, spec
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [python, worker.__file__, json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, env={**os.environ, "PYTHONPATH": _import_root()},
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None  # both are pipes
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout
        ready = self._reply()
        self.load_s, self.versions = ready["load_s"], ready["versions"]
        self.peak_rss_bytes = ready["peak_rss_bytes"]

    def _reply(self) -> dict:
        line = self._stdout.readline()
        if not line:
            self._log.seek(0)
            tail = [t for t in self._log.read().strip().splitlines() if t.strip()][-1:] or ["no output"]
            raise EngineError(f"{self.label}: the worker exited ({tail[0][:200]})")
        reply = json.loads(line)
        if "error" in reply:
            raise EngineError(f"{self.label}: {reply['error']}")
        return reply

    def render(self, request: dict) -> dict:
        self._stdin.write(json.dumps(request) + "\n")
        self._stdin.flush()
        reply = self._reply()
        self.peak_rss_bytes = max(self.peak_rss_bytes, reply["peak_rss_bytes"])
        return reply["timings"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._stdin.write('{"cmd": "quit"}\n')
                self._stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
        self._log.close()


def _import_root() -> str:
    """The folder edgediff is imported from, for workers started as plain scripts."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def stage_times(t: dict) -> dict[str, float]:
    """One render's timings on the stages every engine has: text (tokenize + encoder), unet (all steps),
    vae_decoder, other (everything outside the models: the sampler, noise, pre/post-processing), total."""
    text = t.get("tokenize", 0.0) + t.get("text_encoder", 0.0)
    unet = sum(t.get("steps", []))
    vae = t.get("vae_decoder", 0.0)
    return {
        "text": text,
        "unet": unet,
        "vae_decoder": vae,
        "other": t["total"] - text - unet - vae,
        "total": t["total"],
    }


def summarize(renders: list[dict], batch: int) -> dict:
    per_stage = [stage_times(t) for t in renders]
    steps = [s for t in renders for s in t.get("steps", [])]
    summary: dict[str, Any] = {
        "median": {k: statistics.median(r[k] for r in per_stage) for k in STAGES},
        "min": {k: min(r[k] for r in per_stage) for k in STAGES},
        "max": {k: max(r[k] for r in per_stage) for k in STAGES},
        "unet_step_median": statistics.median(steps) if steps else None,
    }
    summary["images_per_s"] = batch / summary["median"]["total"]
    return summary


def instruction_set() -> str:
    """The widest x86 vector instructions this CPU offers for ONNX Runtime's int8 and float kernels, as the
    CPUID that NumPy reads reports it (so an emulator's CPU model shows as that model): "avx512_vnni",
    "avx_vnni" (AVX2 with VNNI), "avx512", "avx2" or "baseline"."""
    present = set(cpu_features())
    for name, flags in (("avx512_vnni", ("AVX512VNNI",)), ("avx_vnni", ("AVXVNNI",)), ("avx512", ("AVX512BW",)),
                        ("avx2", ("AVX2",))):
        if all(f in present for f in flags):
            return name
    return "baseline"


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "instruction_set": instruction_set()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
        )
        info["avx512_vnni"] = "avx512_vnni" in cpuinfo
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_bytes"] = int(mem) * 1024
    except (OSError, StopIteration):
        pass
    return info


def _engine_specs(bundles: list[Path], s: Settings, notes: list[str]) -> list[tuple[str, dict, str]]:
    specs = [(edgediff_label(b, backend, s.backends),
              {"engine": "edgediff", "model": str(b), "threads": s.threads, "memory": s.memory, "backend": backend},
              sys.executable) for b in bundles for backend in s.backends]
    manifest = read_manifest(bundles[0])
    spacing = manifest.scheduler.timestep_spacing
    source = Path(manifest.provenance.source)
    for peer in s.compare:
        if peer not in PEERS:
            notes.append(f"{peer}: unknown peer; choose from {', '.join(PEERS)}")
        elif peer in OPENVINO_PEERS:
            spec = openvino_spec(peer, bundles[0], manifest, s, notes)
            if spec is not None:
                specs.append((peer, spec, str(s.openvino_python)))
        elif peer.startswith("diffusers"):
            if not (source / "model_index.json").is_file():
                notes.append(f"{peer}: the bundle's source checkpoint {source} is not here; skipped")
                continue
            try:
                import diffusers  # noqa: F401
            except ImportError:
                notes.append(f"{peer}: not installed (pip install 'edgediff[export]'); skipped")
                continue
            device = "cuda" if peer == "diffusers-cuda" else "cpu"
            t5 = manifest.transformer.max_sequence_length if manifest.transformer is not None else None
            specs.append((peer, {"engine": "diffusers", "model": str(source), "threads": s.threads, "device": device,
                                 "spacing": spacing, "sampler": manifest.defaults.sampler,
                                 "max_sequence_length": t5}, sys.executable))
        elif manifest.transformer is not None:
            notes.append(f"optimum: not timed for {manifest.family} bundles (its worker runs Stable Diffusion "
                         "pipelines); skipped")
        else:
            model = s.optimum_model or bundles[0].with_name(bundles[0].name + "-optimum")
            if not Path(s.optimum_python).is_file():
                notes.append(f"optimum: not installed (no {s.optimum_python}; make it with "
                             "benchmarks/setup_optimum.sh); skipped")
            elif not (Path(model) / "model_index.json").is_file():
                notes.append(
                    f"optimum: no Optimum export at {model} (make it with benchmarks/setup_optimum.sh); skipped"
                )
            else:
                specs.append(("optimum", {"engine": "optimum", "model": str(model), "threads": s.threads,
                                          "spacing": spacing, "sampler": manifest.defaults.sampler},
                              str(s.optimum_python)))
    return specs


def edgediff_label(bundle: Path, backend: str, backends: list[str]) -> str:
    """"edgediff:BUNDLE", with the backend where it is not the CPU or several are timed."""
    return f"edgediff:{bundle.name}" if backends == ["cpu"] else f"edgediff-{backend}:{bundle.name}"


def denoiser_of(m) -> str:
    """The component the "unet" stage times: the U-Net, or SD3's / FLUX's transformer."""
    return "transformer" if m.transformer is not None else "unet"


def _flops(bundle: Path, steps_batch: int, s: Settings, cfg: bool) -> dict[str, int]:
    m = read_manifest(bundle)
    f = m.latent.downscale
    size = {"height": s.height, "width": s.width, "latent_height": s.height // f, "latent_width": s.width // f,
            "image_sequence": (s.height // (2 * f)) * (s.width // (2 * f))}

    def flops(name: str, batch: int) -> int:
        c = m.components[name]  # text lengths: the ones the export recorded for this graph
        return count_flops(bundle / c.file, {**{"sequence": 77}, **{a: r.opt for a, r in c.axes.items()}, **size,
                                             "batch": batch})

    mult = 2 if cfg else 1
    return {
        "text_encoder": sum(flops(e.component, mult) for e in m.text_encoders),
        "unet_step": flops(denoiser_of(m), steps_batch * mult),
        "vae_decoder": flops("vae_decoder", steps_batch),
    }


def run_bench(bundles: list[Path], s: Settings, progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Measure every engine on every (steps, batch) configuration; returns the full record (see README)."""
    manifest = read_manifest(bundles[0])
    guidance = manifest.defaults.guidance_scale
    cfg = uses_cfg(manifest, guidance)
    notes: list[str] = []
    specs = _engine_specs(bundles, s, notes)
    if s.one_at_a_time:
        notes.append("one engine resident at a time: the runs of different engines are not interleaved")
    for note in notes:
        progress(note)
    progress("measuring the machine's peak")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    record: dict[str, Any] = {"machine": machine(), "settings": settings,
              "peak": measure_peak(s.threads), "notes": notes, "engines": []}
    requests = [{"prompt": s.prompt, "steps": steps, "guidance": guidance, "sampler": manifest.defaults.sampler,
                 "height": s.height, "width": s.width, "batch": batch, "seed": 0}
                for steps in s.steps for batch in s.batches]
    # interleaved: every engine loaded at once, run by run; one at a time where two engines do not fit in memory
    groups = [specs] if not s.one_at_a_time else [[spec] for spec in specs]
    for group in groups:
        engines = _start(group, manifest.defaults.sampler, notes, progress)
        try:
            results = _measure(engines, requests, s, progress)
            for e in engines:
                entry = {"label": e.label, "engine": e.spec["engine"], "model": e.spec["model"],
                         "backend": e.spec.get("backend"), "load_s": e.load_s,
                         "peak_rss_bytes": e.peak_rss_bytes, "versions": e.versions, **results[e.label]}
                if e.spec["engine"] == "edgediff" and e.spec["backend"] == "cpu":  # the peak measured is the CPU's
                    _add_limits(entry, Path(e.spec["model"]), s, cfg, record["peak"])
                record["engines"].append(entry)
        finally:
            for e in engines:
                e.close()
    _add_ratios(record)
    return record


def _start(specs: list[tuple[str, dict, str]], sampler: str, notes: list[str],
           progress: Callable[[str], None]) -> list[EngineProcess]:
    engines = []
    for label, spec, python in specs:
        progress(f"loading {label}")
        try:
            engines.append(EngineProcess(label, {**spec, "sampler": sampler}, python))
        except EngineError as err:
            notes.append(f"{err}; skipped")
            progress(notes[-1])
    return engines


def _measure(engines: list[EngineProcess], requests: list[dict], s: Settings,
             progress: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Warm-up renders, then `s.runs` measured ones per request, engine after engine within each run."""
    results: dict[str, dict[str, Any]] = {e.label: {"configs": []} for e in engines}
    for i, request in enumerate(requests):
        steps, batch = request["steps"], request["batch"]
        for e in engines:
            progress(f"{e.label}: warm-up, {steps} steps, batch {batch}")
            cold = e.render(request)
            if i == 0:
                results[e.label]["cold_s"] = cold["total"]
            for _ in range(s.warmup - 1):
                e.render(request)
        runs: dict[str, list[dict[str, float]]] = {e.label: [] for e in engines}
        for r in range(s.runs):
            for e in engines:
                progress(f"{e.label}: run {r + 1}/{s.runs}, {steps} steps, batch {batch}")
                runs[e.label].append(e.render({**request, "seed": r}))
        for e in engines:
            results[e.label]["configs"].append(
                {"steps": steps, "batch": batch, "runs": runs[e.label], **summarize(runs[e.label], batch)})
    return results


def _add_limits(entry: dict, bundle: Path, s: Settings, cfg: bool, peak: dict) -> None:
    """FLOPs per call from the graph, and the fraction of the machine's peak each stage reaches."""
    precisions = {name: c.precision for name, c in read_manifest(bundle).components.items()}
    for config in entry["configs"]:
        flops = _flops(bundle, config["batch"], s, cfg)
        config["flops"] = flops
        med = config["median"]
        times = {
            "text_encoder": med["text"],
            "unet_step": config["unet_step_median"],
            "vae_decoder": med["vae_decoder"],
        }
        fraction = {}
        for stage, n in flops.items():
            component = denoiser_of(read_manifest(bundle)) if stage == "unet_step" else stage
            limit = peak["int8_gops"] if precisions.get(component) == "int8" else peak["float32_gflops"]
            if times[stage] and limit:
                fraction[stage] = n / times[stage] / (limit * 1e9)
        config["fraction_of_peak"] = fraction


def _add_ratios(record: dict) -> None:
    """For each edgediff engine, its time over every other engine's, per stage (medians) and per interleaved run
    pair (totals): below 1, edgediff is faster. Load times likewise."""
    engines = record["engines"]
    for e in (x for x in engines if x["engine"] == "edgediff"):
        e["time_ratio_to"], e["pair_ratios_to"], e["load_ratio_to"] = {}, {}, {}
        for other in engines:
            if other is e:
                continue
            e["time_ratio_to"][other["label"]] = [
                {k: (c["median"][k] / o["median"][k] if o["median"][k] > 0 else None) for k in STAGES}
                for c, o in zip(e["configs"], other["configs"])
            ]
            e["pair_ratios_to"][other["label"]] = [
                [r["total"] / q["total"] for r, q in zip(c["runs"], o["runs"])]
                for c, o in zip(e["configs"], other["configs"])
            ]
            e["load_ratio_to"][other["label"]] = e["load_s"] / other["load_s"]
