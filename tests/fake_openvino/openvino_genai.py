"""A small fake of OpenVINO GenAI's Text2ImagePipeline, for the bench peer's tests (CI has no OpenVINO GenAI venv).

Its calls follow the documented Python API (2026.x): Text2ImagePipeline(models_path), set_scheduler(
Scheduler.from_config(path, Scheduler.Type.X)), reshape(num_images_per_prompt, height, width, guidance_scale),
compile(device, **properties), generate(prompt, **kwargs) and get_performance_metrics() (text encoders and VAE in
milliseconds, raw per-step durations in microseconds). Like the real one, a pipeline reshaped to static shapes
refuses a generate() of another shape, and reshape() after compile() fails; FAKE_OPENVINO_FAIL makes generate() fail
with that message. Every call is appended to CALLS and, where
FAKE_OPENVINO_LOG names a file, written there as a JSON line (for a worker in another process).
"""

from __future__ import annotations

import enum
import json
import os
from types import SimpleNamespace
from typing import Any

__version__ = "2026.0.0-fake"
CALLS: list[tuple[str, dict[str, Any]]] = []
TEXT_MS, STEP_US, VAE_MS = 5.0, 2000.0, 7.0  # the fake's "durations": step i takes STEP_US * (i + 1)


def _record(name: str, **args: Any) -> None:
    CALLS.append((name, args))
    if os.environ.get("FAKE_OPENVINO_LOG"):
        with open(os.environ["FAKE_OPENVINO_LOG"], "a") as f:
            f.write(json.dumps([name, args]) + "\n")


class Scheduler:
    class Type(enum.Enum):
        AUTO = 0
        LCM = 1
        DDIM = 2
        EULER_DISCRETE = 3
        FLOW_MATCH_EULER_DISCRETE = 4
        PNDM = 5
        EULER_ANCESTRAL_DISCRETE = 6
        LMS_DISCRETE = 7

    def __init__(self, config: str, kind: Scheduler.Type):
        self.config, self.kind = config, kind

    @staticmethod
    def from_config(config_path: str, scheduler_type: Scheduler.Type = Type.AUTO) -> Scheduler:
        if not os.path.isfile(config_path):
            raise RuntimeError(f"Failed to open '{config_path}'")
        return Scheduler(config_path, scheduler_type)


class TorchGenerator:
    def __init__(self, seed: int):
        self.seed = seed


class Text2ImagePipeline:
    def __init__(self, models_path: str):
        if not os.path.isfile(os.path.join(models_path, "model_index.json")):
            raise RuntimeError(f"no model_index.json in {models_path}")
        self.shape: tuple | None = None
        self.compiled = False
        self.metrics: Any = None
        _record("init", models_path=str(models_path))

    def set_scheduler(self, scheduler: Scheduler) -> None:
        _record("set_scheduler", config=scheduler.config, type=scheduler.kind.name)

    def reshape(self, num_images_per_prompt: int, height: int, width: int, guidance_scale: float) -> None:
        if self.compiled:
            raise RuntimeError("reshape is only possible before compile")
        self.shape = (num_images_per_prompt, height, width, guidance_scale)
        _record("reshape", shape=list(self.shape))

    def compile(self, device: str, **properties: Any) -> None:
        self.compiled = True
        _record("compile", device=device, properties=properties)

    def generate(self, prompt: str, **kwargs: Any) -> Any:
        if not self.compiled:
            raise RuntimeError("the pipeline is not compiled")
        if os.environ.get("FAKE_OPENVINO_FAIL"):
            raise RuntimeError(os.environ["FAKE_OPENVINO_FAIL"])
        shape = (kwargs["num_images_per_prompt"], kwargs["height"], kwargs["width"], kwargs["guidance_scale"])
        if self.shape is not None and shape != self.shape:
            raise RuntimeError(f"generate {shape} on a pipeline reshaped to {self.shape}")
        args = {k: v for k, v in kwargs.items() if k != "generator"}
        _record("generate", prompt=prompt, seed=kwargs["generator"].seed, **args)
        steps = [STEP_US * (i + 1) for i in range(kwargs["num_inference_steps"])]
        raw = SimpleNamespace(unet_inference_durations=steps, transformer_inference_durations=[],
                              iteration_durations=[])
        self.metrics = SimpleNamespace(raw_metrics=raw, get_vae_decoder_infer_duration=lambda: VAE_MS,
                                       get_text_encoder_infer_duration=lambda: {"text_encoder": TEXT_MS})
        return SimpleNamespace(shape=[shape[0], shape[1], shape[2], 3])

    def get_performance_metrics(self) -> Any:
        return self.metrics
