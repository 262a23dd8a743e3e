"""One engine in its own process for `edgediff bench`: a JSON spec on the command line, JSON lines in and out.

Runs as a plain script (`python worker.py SPEC`) so that it also runs under another virtual environment (Optimum's
exporter pins an older transformers): it imports nothing but the standard library until it knows its engine.

Protocol: the worker loads its model and prints {"ready": true, "load_s", "peak_rss_bytes", "versions"}; then for
each request line {"prompt", "steps", "guidance", "sampler", "height", "width", "batch", "seed"} it renders and
prints {"timings": {text_encoder, steps: [...], vae_decoder, total, ...}, "peak_rss_bytes"}; "quit" ends it.
Failures print {"error": "one line"} and exit 1.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Peers run the sampler edgediff's bundle names, through diffusers' own scheduler classes.
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # SD3 / FLUX: the checkpoint's own, as it is
}


def _peer_call(pipe, clock, spec: dict, sync=lambda: None):
    import torch

    name, extra = DIFFUSERS_SCHEDULERS.get(spec["sampler"], DIFFUSERS_SCHEDULERS["euler"])
    if spec["sampler"] != "flow_euler":
        scheduler_cls = getattr(__import__("diffusers"), name)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, timestep_spacing=spec["spacing"], **extra)
    # FLUX pads T5 to 512 unless told; the bundle's length is what edgediff runs (SD3: 256 either way)
    t5 = {"max_sequence_length": spec["max_sequence_length"]} if spec.get("max_sequence_length") else {}
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def render(req):
        def call():
            with torch.inference_mode():
                pipe(
                    req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance"],
                    height=req["height"], width=req["width"], num_images_per_prompt=req["batch"],
                    generator=torch.Generator().manual_seed(req["seed"]), output_type="np", **t5,
                )

        sync()  # nothing queued on a GPU before the clock starts
        return clock.time(call)

    return render


def load_edgediff(spec: dict):
    from edgediff import Pipeline, __version__

    pipe = Pipeline.load(spec["model"], backend=spec.get("backend", "cpu"), threads=spec.get("threads"),
                         memory=spec.get("memory", "normal"))

    def render(req):
        out = pipe(
            req["prompt"], num_inference_steps=req["steps"], guidance_scale=req["guidance"], height=req["height"],
            width=req["width"], num_images_per_prompt=req["batch"], seed=req["seed"], sampler=req["sampler"],
            output_type="np",
        )
        return out.timings

    import onnxruntime

    return render, {"edgediff": __version__, "onnxruntime": onnxruntime.__version__,
                    "backend": spec.get("backend", "cpu")}


def load_diffusers(spec: dict):
    """diffusers' PyTorch pipeline: fp32 on the CPU, or (device "cuda") fp16 on the GPU, synchronised around
    every timed stage so that a stage's time is its kernels' and not just their launch."""
    import diffusers
    import torch

    cuda = spec.get("device") == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA GPU")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # components the checkpoint leaves out (SD3 without T5: text_encoder_3 null in model_index.json) are passed
    # as None, as diffusers' own from_pretrained does not
    index = json.loads((Path(spec["model"]) / "model_index.json").read_text())
    absent = {name: None for name, entry in index.items() if entry == [None, None]}
    pipe = diffusers.DiffusionPipeline.from_pretrained(spec["model"], **absent,
                                                       torch_dtype=torch.float16 if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        pipe.to("cuda")
    clock = _stage_timer()
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    for obj, method, stage in ((pipe, "encode_prompt", "text_encoder"), (denoiser, "forward", "steps"),
                               (pipe.vae, "decode", "vae_decoder")):
        _wrap_synchronised(obj, method, sync, after=True)
        clock.wrap(obj, method, stage)
        _wrap_synchronised(obj, method, sync, after=False)
    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__}
    if cuda:
        versions["gpu"] = torch.cuda.get_device_name()
    return _peer_call(pipe, clock, spec, sync), versions


def _wrap_synchronised(obj, method: str, sync, after: bool) -> None:
    """Call `sync` after (inside the stage's clock) or before (outside it) every call of `obj.method`."""
    inner = getattr(obj, method)

    def synchronised(*args, **kwargs):
        if not after:
            sync()
        result = inner(*args, **kwargs)
        if after:
            sync()
        return result

    setattr(obj, method, synchronised)


def load_optimum(spec: dict):
    import onnxruntime
    import optimum.onnxruntime as ort_pipelines

    options = onnxruntime.SessionOptions()
    if spec.get("threads"):
        options.intra_op_num_threads = spec["threads"]
    pipe = ort_pipelines.ORTStableDiffusionPipeline.from_pretrained(
        spec["model"], provider="CPUExecutionProvider", session_options=options
    )
    clock = _stage_timer()
    clock.wrap(pipe, "encode_prompt", "text_encoder")
    clock.wrap(pipe.unet, "forward", "steps")
    clock.wrap(pipe.vae_decoder, "forward", "vae_decoder")
    import optimum

    versions = {"optimum": getattr(optimum, "__version__", "?"), "onnxruntime": onnxruntime.__version__}
    return _peer_call(pipe, clock, spec), versions


# edgediff's sampler names -> OpenVINO GenAI's scheduler types (each built from the export's scheduler config, so
# the timestep spacing is the checkpoint's own)
OPENVINO_SCHEDULERS = {"euler": "EULER_DISCRETE", "euler_a": "EULER_ANCESTRAL_DISCRETE", "lcm": "LCM", "ddim": "DDIM",
                       "flow_euler": "FLOW_MATCH_EULER_DISCRETE"}


def load_openvino(spec: dict):
    """OpenVINO GenAI's Text2ImagePipeline on optimum-intel's export, compiled for the CPU with static shapes (spec
    "static"), as OpenVINO's samples and FastSD run it. Its stage times are its own performance metrics; it needs
    no edgediff import, so its venv needs no onnxruntime."""
    import openvino_genai as ov_genai

    # f32 as edgediff computes (OpenVINO's CPU default is bf16 where the CPU has AMX or AVX-512 BF16)
    properties: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if spec.get("threads"):
        properties["INFERENCE_NUM_THREADS"] = spec["threads"]
    compiled: dict[str, Any] = {}

    def pipeline(batch: int, height: int, width: int, guidance: float):
        key = (batch, height, width, guidance)
        if compiled.get("key") != key:  # static shapes are compiled in: a new configuration compiles again
            compiled.clear()
            pipe = ov_genai.Text2ImagePipeline(spec["model"])
            kind = OPENVINO_SCHEDULERS.get(spec["sampler"])
            if kind is not None:
                config = os.path.join(spec["model"], "scheduler", "scheduler_config.json")
                pipe.set_scheduler(ov_genai.Scheduler.from_config(config, getattr(ov_genai.Scheduler.Type, kind)))
            if spec.get("static"):
                pipe.reshape(batch, height, width, guidance)
            pipe.compile("CPU", **properties)
            compiled.update(key=key, pipe=pipe)
        return compiled["pipe"]

    pipeline(spec["batch"], spec["height"], spec["width"], spec["guidance"])

    def render(req):
        pipe = pipeline(req["batch"], req["height"], req["width"], req["guidance"])
        start = time.perf_counter()
        pipe.generate(req["prompt"], width=req["width"], height=req["height"], num_inference_steps=req["steps"],
                      guidance_scale=req["guidance"], num_images_per_prompt=req["batch"],
                      generator=ov_genai.TorchGenerator(req["seed"]))  # torch's CPU noise, as the other engines
        total = time.perf_counter() - start
        return {**openvino_stage_times(pipe.get_performance_metrics()), "total": total}

    import openvino

    return render, {"openvino_genai": ov_genai.__version__, "openvino": openvino.__version__,
                    "variant": os.path.basename(os.path.normpath(spec["model"]))}


def openvino_stage_times(metrics) -> dict[str, Any]:
    """One generate()'s stage times in seconds from OpenVINO GenAI's metrics: the text encoders and the VAE decode
    (milliseconds), each denoising step (raw, microseconds; the U-Net's, or SD3's / FLUX's transformer's)."""
    raw = metrics.raw_metrics
    steps = list(raw.unet_inference_durations) or list(raw.transformer_inference_durations)
    return {"text_encoder": sum(metrics.get_text_encoder_infer_duration().values()) / 1e3,
            "steps": [d / 1e6 for d in steps], "vae_decoder": metrics.get_vae_decoder_infer_duration() / 1e3}


def _stage_timer():
    # imported only once the engine is known (see the module's docstring); harness.py puts edgediff on the path
    from edgediff.runtime.timing import StageTimer

    return StageTimer()


ENGINES = {"edgediff": load_edgediff, "diffusers": load_diffusers, "optimum": load_optimum, "openvino": load_openvino}


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        start = time.perf_counter()
        render, versions = ENGINES[spec["engine"]](spec)
        emit({"ready": True, "load_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
              "versions": versions})
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("cmd") == "quit":
                break
            emit({"timings": render(request), "peak_rss_bytes": peak_rss_bytes()})
    except Exception as e:  # the harness reports it in one line and goes on with the other engines
        emit({"error": f"{type(e).__name__}: {e}".splitlines()[0]})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
