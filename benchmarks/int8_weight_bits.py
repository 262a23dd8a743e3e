"""The test suite's tiny int8 render against fp32, with weights in 8 bits (before) and in 7 bits (the export now).

    python benchmarks/int8_weight_bits.py export WORK      # builds the tiny SD 1.x checkpoint, exports fp32, int8
                                                           # (7-bit weights, as edgediff does) and int8-8bit
    python benchmarks/int8_weight_bits.py render WORK      # PSNR of each int8 bundle's render against fp32's
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_weight_bits.py render WORK   # the same, AVX2

The render is tests/test_precision.py's (3 steps, 48x32, seed 5, calibrated as the test does). Export once,
natively; render natively and under qemu's Haswell CPU model, where ONNX Runtime picks its AVX2 kernels.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a red cat on a sofa"
RENDER = dict(num_inference_steps=3, height=32, width=48, seed=5, output_type="np")


def export(work: Path) -> None:
    import onnxruntime.quantization as quantization
    import tiny_pipelines

    from edgediff.export.calibrate import Calibration
    from edgediff.export.convert import export_bundle

    calibration = Calibration(prompts=("a red cat", "a castle on a hill at dawn", "a bowl of fruit"), steps=2)
    checkpoint = tiny_pipelines.build("sd1", work / "checkpoint")
    export_bundle(checkpoint, work / "fp32", force=True)
    export_bundle(checkpoint, work / "int8", precision="int8", calibration=calibration, force=True)
    quantize = quantization.quantize_static

    def full_range(*args, **kwargs):  # what the export did before: weights in 8 bits
        return quantize(*args, **{**kwargs, "reduce_range": False})

    quantization.quantize_static = full_range
    try:
        export_bundle(checkpoint, work / "int8-8bit", precision="int8", calibration=calibration, force=True)
    finally:
        quantization.quantize_static = quantize


def render(work: Path) -> None:
    from edgediff import Pipeline
    from edgediff.bench.harness import instruction_set
    from edgediff.export.gate import psnr_db

    reference = Pipeline.load(work / "fp32")(PROMPT, **RENDER).images
    for name in ("int8", "int8-8bit"):
        images = Pipeline.load(work / name)(PROMPT, **RENDER).images
        print(f"{instruction_set()}: {name} against fp32: {psnr_db(reference, images):.2f} dB")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "render"):
        sys.exit(__doc__)
    {"export": export, "render": render}[sys.argv[1]](Path(sys.argv[2]))
