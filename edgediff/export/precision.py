"""Reduced-precision variants of an exported fp32 graph, and the gate that holds each to the fp32 graph.

The fp32 graph has already been proven against PyTorch (onnx.py); a converted graph is proven against that fp32
graph on the same inputs, with a looser tolerance stated per component and precision, and the export fails past it.
Inputs and outputs keep the fp32 signature the manifest states, so the runtime feeds every precision alike.

fp16 keeps fp32 "islands" where half precision overflows or loses too much: every normalisation (GroupNorm is
exported as InstanceNormalization; its variance of 512-channel activations overflows fp16), and the attention
softmax where the model asks for upcast attention (SD 2.1) or where a causal mask's large negatives meet it (the
text encoder). ONNX Runtime's converter inserts the casts around each island.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..bundle import Conversion, Parity, SessionOptions
from ..runtime.sessions import session_options
from .onnx import ParityError, default_ort_options, save_graph

PRECISIONS = ("fp32", "fp16", "int8")

NORMALISATIONS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization")


@dataclass(frozen=True)
class Gate:
    """How close a converted graph must stay to the fp32 graph: max abs error relative to the reference's largest
    magnitude (floored at 1), and a floor on PSNR over the reference's range, both over every output."""

    relative: float
    min_psnr_db: float

    def check(self, component: str, output: str, reference: np.ndarray, got: np.ndarray, precision: str) -> dict:
        reference = reference.astype(np.float32)
        diff = reference - got.astype(np.float32)
        err = float(np.max(np.abs(diff)))
        limit = self.relative * max(1.0, float(np.max(np.abs(reference))))
        psnr = psnr_db(reference, got)
        if not (err <= limit and psnr >= self.min_psnr_db):
            raise ParityError(
                f"{component}.{output}: the {precision} graph differs from fp32 by {err:.3g} (limit {limit:.3g}), "
                f"PSNR {psnr:.1f} dB (floor {self.min_psnr_db:g} dB); not written"
            )
        return {"max_abs_err": err, "limit": limit, "psnr_db": psnr, "output": output}


# Stated per component: the U-Net's noise prediction and the decoder's pixels tolerate what their images show;
# int8 is held to PSNR (its error is spread noise, so a max-abs bound would be either loose or flaky).
GATES: dict[str, dict[str, Gate]] = {
    "fp16": {
        # fp16 carries 11 bits: ~1e-3 per op, compounded over a few dozen layers on the U-Net's path
        "text_encoder": Gate(relative=2e-2, min_psnr_db=40.0),
        "text_encoder_2": Gate(relative=2e-2, min_psnr_db=40.0),
        "unet": Gate(relative=3e-2, min_psnr_db=40.0),
        "vae_decoder": Gate(relative=2e-2, min_psnr_db=40.0),
        "vae_encoder": Gate(relative=2e-2, min_psnr_db=40.0),
    },
    "int8": {
        "unet": Gate(relative=0.5, min_psnr_db=22.0),
        "vae_decoder": Gate(relative=0.5, min_psnr_db=22.0),
    },
}


def psnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio of `got` against `reference`, the peak being the reference's range."""
    reference = reference.astype(np.float64)
    mse = float(np.mean((reference - got.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def run_graph(path: Path, feeds_list: list[dict[str, np.ndarray]], ort_options: SessionOptions) -> list[list[np.ndarray]]:
    options = session_options(ort, ort_options, threads=None, lean=False)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = [session.run(None, feeds) for feeds in feeds_list]
    del session
    return out


def gate(
    component: str,
    precision: str,
    reference: list[list[np.ndarray]],
    path: Path,
    feeds_list: list[dict[str, np.ndarray]],
    output_names: list[str],
    ort_options: SessionOptions,
) -> Parity:
    """Run the converted graph on `feeds_list` and hold it to the fp32 outputs `reference`; returns the worst case
    (by PSNR) for the manifest, or raises ParityError."""
    limits = GATES[precision][component]
    got = run_graph(path, feeds_list, ort_options)
    worst: dict = {}
    for ref_outs, got_outs in zip(reference, got):
        for name, r, g in zip(output_names, ref_outs, got_outs):
            result = limits.check(component, name, r, g, precision)
            if not worst or result["psnr_db"] < worst["psnr_db"]:
                worst = result
    return Parity(**worst, against="fp32 graph", relative_tolerance=limits.relative,
                  min_psnr_db=limits.min_psnr_db, samples=len(feeds_list))


def fp16_islands(component: str, model: onnx.ModelProto, *, upcast_attention: bool) -> list[str]:
    """Op types kept in fp32 for this component."""
    islands = list(NORMALISATIONS)
    if component.startswith("text_encoder") or upcast_attention:
        islands.append("Softmax")
    present = {n.op_type for n in model.graph.node}
    return [op for op in islands if op in present]


def convert_fp16(component: str, path: Path, *, upcast_attention: bool = False) -> tuple[list[Path], SessionOptions, Conversion]:
    """Rewrite the fp32 graph at `path` as fp16 in place (fp32 inputs and outputs, fp32 islands).

    Returns the files written, the ONNX Runtime options, and what the manifest records about the conversion."""
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )

    islands = fp16_islands(component, onnx.load(str(path), load_external_data=False), upcast_attention=upcast_attention)
    # Given the path, the converter infers shapes on disk (in-memory inference stops at protobuf's 2 GiB).
    # keep_io_types: the runtime's feeds and outputs stay float32, as the manifest says; the casts are in-graph.
    model = convert_float_to_float16(str(path), keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST) + islands)
    written, weights = save_graph(model, path)
    del model
    return written, default_ort_options(weights), Conversion(fp32_islands=tuple(islands))


def convert_component(
    component: str,
    precision: str,
    path: Path,
    output_names: list[str],
    fp32_ort_options: SessionOptions,
    gate_feeds: list[dict[str, np.ndarray]],
    calibration_feeds: list[dict[str, np.ndarray]] | None = None,
    *,
    upcast_attention: bool = False,
) -> tuple[list[Path], SessionOptions, Parity, Conversion]:
    """Convert the proven fp32 graph at `path` to `precision` in place and gate it against the fp32 graph.

    Returns the files written, the ONNX Runtime options, the parity record, and what the manifest records about
    the conversion (fp32 islands; the quantization report's summary)."""
    from .quantize import quantize_int8

    reference = run_graph(path, gate_feeds, fp32_ort_options)
    if precision == "fp16":
        written, options, details = convert_fp16(component, path, upcast_attention=upcast_attention)
    elif precision == "int8":
        written, options, details = quantize_int8(path, calibration_feeds or [])
    else:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    parity = gate(component, precision, reference, path, gate_feeds, output_names, options)
    return written, options, parity, details
