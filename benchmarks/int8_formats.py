"""int8 formats on this CPU: speed and error of each against fp32, on a stand-in for the U-Net's int8 work.

The graph: four 128-channel 3x3 convolutions at 64x64 with SiLU between them, then a 4096x128 @ 128x512 linear
(the shapes of an SD U-Net's outer block), random He-initialised weights. Each format is quantized with
onnxruntime's static quantizer (QDQ, per-channel weights, MinMax over 8 random inputs) and run at ONNX Runtime's
"extended" level with pre-packed weights, as edgediff runs its int8 graphs.

    python benchmarks/int8_formats.py --runs 20 --json benchmarks/results/int8-formats-avx512vnni.json
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int8_formats.py --runs 1   # AVX2 numerics, emulated

Under qemu (Debian's qemu-user), onnxruntime sees an AVX2 CPU without AVX-512 or VNNI and picks its AVX2 kernels,
so the error column is an AVX2 machine's; its times are the emulator's, not a CPU's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgediff.bench.harness import instruction_set  # noqa: E402
from edgediff.export.gate import psnr_db  # noqa: E402

CHANNELS, SIDE, TOKENS, WIDTH = 128, 64, 4096, 512
# name: (activation type, weight type, reduce_range: weights in 7 bits, [-64, 64])
FORMATS = {
    "u8s8": (QuantType.QUInt8, QuantType.QInt8, False),
    "u8s8-7bit": (QuantType.QUInt8, QuantType.QInt8, True),
    "u8u8": (QuantType.QUInt8, QuantType.QUInt8, False),
    "s8s8": (QuantType.QInt8, QuantType.QInt8, False),
}


def stand_in(rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(4):
        w = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * np.float32(np.sqrt(2 / (9 * CHANNELS)))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        nodes.append(helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]))
        nodes.append(helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"]))
        x = f"a{i}"
    inits.append(numpy_helper.from_array(np.array([1, CHANNELS, TOKENS], np.int64), "shape"))
    inits.append(numpy_helper.from_array(rng.standard_normal((CHANNELS, WIDTH)).astype(np.float32)
                                         / np.float32(np.sqrt(CHANNELS)), "proj"))
    nodes += [helper.make_node("Reshape", [x, "shape"], ["flat"]),
              helper.make_node("Transpose", ["flat"], ["tokens"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["tokens", "proj"], ["y"], name="linear")]
    graph = helper.make_graph(
        nodes, "stand_in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[np.ndarray]):
        self._it = iter({"x": f} for f in feeds)

    def get_next(self):
        return next(self._it, None)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(sess: ort.InferenceSession, x: np.ndarray, runs: int) -> tuple[np.ndarray, list[float]]:
    out = sess.run(None, {"x": x})[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return out, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    logging.root.setLevel(logging.ERROR)  # the quantizer's pre-processing advice, once per format
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, CHANNELS, SIDE, SIDE)).astype(np.float32) for _ in range(8)]
    x = rng.standard_normal((1, CHANNELS, SIDE, SIDE)).astype(np.float32)
    record: dict = {
        "instruction_set": instruction_set(),
        "onnxruntime": ort.__version__,
        "runs": args.runs,
        "formats": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        onnx.save(stand_in(rng), str(fp32_path))
        reference, fp32_times = timed(session(fp32_path, args.threads), x, args.runs)
        record["fp32_ms"] = 1e3 * statistics.median(fp32_times)
        print(f"fp32        {record['fp32_ms']:8.1f} ms")
        for name, (activations, weights, reduce_range) in FORMATS.items():
            path = Path(tmp) / f"{name}.onnx"
            quantize_static(str(fp32_path), str(path), Feeds(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=activations, weight_type=weights,
                            reduce_range=reduce_range,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": weights == QuantType.QInt8,
                                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}})
            out, times = timed(session(path, args.threads), x, args.runs)
            ms = 1e3 * statistics.median(times)
            record["formats"][name] = {"ms": ms, "vs_fp32": ms / record["fp32_ms"], "psnr_db": psnr_db(reference, out)}
            print(
                f"{name:11s} {ms:8.1f} ms  {ms / record['fp32_ms']:.2f}x fp32  PSNR {psnr_db(reference, out):5.1f} dB"
            )
    print("instruction set:", record["instruction_set"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
