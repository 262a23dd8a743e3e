"""OpenVINO's full static int8 quantization of optimum-intel's fp32 export, calibrated on edgediff's own prompts.

Runs in benchmarks/setup_openvino.sh's virtual environment (optimum-intel, nncf):

    benchmarks/.venv-openvino/bin/python benchmarks/openvino_quantize.py FP32_EXPORT OUT [--steps 2 --guidance 0]

optimum-intel's own calibration (`--quant-mode int8 --dataset conceptual_captions`) downloads its prompts from the
hub, which is not reachable here, and renders 50-step CFG trajectories. Here the U-Net's inputs are recorded along
the renders edgediff's int8 export calibrates on: its prompts (all but the held-out last), its step count and
guidance. OVQuantizer then quantizes the U-Net fully (weights and activations int8, ranges from those inputs) and
the other models weight-only int8, which is what its full mode does for a diffusion pipeline.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import time
from pathlib import Path

CALIBRATION_SOURCE = Path(__file__).resolve().parents[1] / "edgediff" / "export" / "calibrate.py"


def edgediff_prompts() -> list[str]:
    """edgediff's calibration prompts, read from its source: this venv cannot import edgediff (no onnxruntime),
    and a second copy of the list would drift."""
    tree = ast.parse(CALIBRATION_SOURCE.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PROMPTS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"no PROMPTS in {CALIBRATION_SOURCE}")


def record_unet_inputs(pipe, prompts: list[str], steps: int, guidance: float, size: int) -> list:
    from optimum.intel.openvino.quantization import InferRequestWrapper

    pipe.compile()
    inputs: list = []
    pipe.unet.request = InferRequestWrapper(pipe.unet.request, inputs)
    try:
        for i, prompt in enumerate(prompts):
            # latents only: the VAE decode is most of a render's time and feeds nothing the U-Net sees
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 output_type="latent")
            print(f"calibration render {i + 1}/{len(prompts)}: {len(inputs)} U-Net inputs", flush=True)
    finally:
        pipe.unet.request = pipe.unet.request.request
    return inputs


def copy_missing(fp32: Path, out: Path) -> None:
    """The files the quantizer does not write (OpenVINO's tokenizer and detokenizer IRs, which Text2ImagePipeline
    needs), unchanged from the fp32 export."""
    for src in fp32.rglob("*"):
        dst = out / src.relative_to(fp32)
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp32", type=Path, help="optimum-intel's fp32 OpenVINO export")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=2, help="steps per calibration render (edgediff: 2..8)")
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    if not (args.fp32 / "model_index.json").is_file():
        print(f"error: {args.fp32} is not an OpenVINO export (no model_index.json)", file=sys.stderr)
        return 1

    import nncf
    from optimum.intel import OVConfig, OVDiffusionPipeline, OVQuantizationConfig, OVQuantizer
    from optimum.intel.openvino.quantization import OVCalibrationDataset

    start = time.perf_counter()
    pipe = OVDiffusionPipeline.from_pretrained(args.fp32, compile=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = edgediff_prompts()[:-1]  # the last is edgediff's held-out prompt
    inputs = record_unet_inputs(pipe, prompts, args.steps, args.guidance, args.size)
    calibrated = time.perf_counter()
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    OVQuantizer(pipe).quantize(
        calibration_dataset=OVCalibrationDataset({"unet": nncf.Dataset(inputs)}),
        ov_config=OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(inputs))),
        save_directory=partial,
    )
    copy_missing(args.fp32, partial)
    partial.rename(args.out)
    done = time.perf_counter()
    print(f"{args.out}: {len(inputs)} U-Net samples from {len(prompts)} prompts; calibration renders "
          f"{calibrated - start:.0f} s, quantization {done - calibrated:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
