"""The parity gate: every exported or converted graph is run on ONNX Runtime and held to reference outputs.

One gate for every export step: the fp32 graph against PyTorch (onnx.py), a fp16 or int8 graph against the proven
fp32 graph (precision.py). The graph is opened the way the runtime opens it (its manifest options, through the
graph cache), so what passes here is what renders. A failure raises ParityError with one line; the caller writes
nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import FileEntry, Parity, SessionOptions
from ..runtime import graph_cache
from ..runtime.backends.ort import session_options


class ParityError(RuntimeError):
    """An exported component does not reproduce its reference within its tolerance."""


@dataclass(frozen=True)
class Tolerance:
    """How close a graph must stay to its reference, over every output: max abs error relative to the reference's
    largest magnitude (floored at 1), and optionally a floor on PSNR over the reference's range."""

    relative: float
    min_psnr_db: float | None = None

    def limit(self, reference_max: float) -> float:
        return self.relative * max(1.0, reference_max)


# ONNX Runtime against PyTorch, both fp32: what is left is kernel and fusion order.
FP32_TOLERANCE = Tolerance(relative=2e-3)

# A converted graph against the fp32 graph, stated per precision and component: the U-Net's noise prediction and
# the decoder's pixels tolerate what their images show; int8 is held to PSNR (its error is spread noise, so a
# max-abs bound would be either loose or flaky).
INT4_PSNR = 20.0
REDUCED_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp16": {
        # fp16 carries 11 bits: ~1e-3 per op, compounded over a few dozen layers on the U-Net's path
        "text_encoder": Tolerance(relative=2e-2, min_psnr_db=40.0),
        "text_encoder_2": Tolerance(relative=2e-2, min_psnr_db=40.0),
        "text_encoder_3": Tolerance(relative=2e-2, min_psnr_db=40.0),  # SD3's T5
        "unet": Tolerance(relative=3e-2, min_psnr_db=40.0),
        "transformer": Tolerance(relative=3e-2, min_psnr_db=40.0),
        "vae_decoder": Tolerance(relative=2e-2, min_psnr_db=40.0),
        "vae_encoder": Tolerance(relative=2e-2, min_psnr_db=40.0),
    },
    "int8": {
        "unet": Tolerance(relative=0.5, min_psnr_db=22.0),
        "transformer": Tolerance(relative=0.5, min_psnr_db=22.0),
        "vae_decoder": Tolerance(relative=0.5, min_psnr_db=22.0),
        "text_encoder_2": Tolerance(relative=0.5, min_psnr_db=22.0),  # FLUX's T5
        "text_encoder_3": Tolerance(relative=0.5, min_psnr_db=22.0),  # SD3's T5
    },
    # Weight-only: 4 bits hold each weight to about 20 dB (a scale per 128 Gaussian weights), and the error
    # compounds over the blocks as int8's does; the tiny random-weight models clear the floor by 7-15 dB
    # (docs/transformers.md), a full-width FLUX.1 block's output by 21 dB (docs/flux_streaming.md).
    "int4": {
        "transformer": Tolerance(relative=0.5, min_psnr_db=INT4_PSNR),
        "text_encoder_2": Tolerance(relative=0.5, min_psnr_db=INT4_PSNR),  # FLUX's T5
        "text_encoder_3": Tolerance(relative=0.5, min_psnr_db=INT4_PSNR),  # SD3's T5
    },
}


def psnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio of `got` against `reference`, the peak being the reference's range."""
    reference = reference.astype(np.float64)
    mse = float(np.mean((reference - got.astype(np.float64)) ** 2))
    peak = float(reference.max() - reference.min()) or 1.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def run_graph(path: Path, feeds_list: list[dict[str, np.ndarray]], ort_options: SessionOptions,
              files: tuple[FileEntry, ...] = (), output_names: list[str] | None = None) -> list[list[np.ndarray]]:
    """The graph's outputs on each feed, on the CPU, opened as the runtime opens it: `files` (its manifest
    entries) let a graph whose options ask for it load through the graph cache, which leaves the graph optimised
    for this machine beside it."""
    import onnxruntime as ort

    options = session_options(ort, ort_options, threads=None, lean=False)
    session = graph_cache.open_session(ort, path, files, options, ["CPUExecutionProvider"],
                                       cache=bool(files) and ort_options.cache_optimized_graph)
    try:
        return [session.run(output_names, feeds) for feeds in feeds_list]
    finally:
        del session  # a full-size U-Net's session is gigabytes: gone before the caller's next step


@dataclass(frozen=True)
class Check:
    """What is checked and how it is named in a failure: `name`.output: `subject` differs from `against`."""

    name: str
    subject: str
    against: str
    tolerance: Tolerance


def check_graph(check: Check, path: Path, feeds_list: list[dict[str, np.ndarray]],
                references: list[list[np.ndarray]], output_names: list[str], ort_options: SessionOptions, *,
                files: tuple[FileEntry, ...] = (), labels: list[str] | None = None) -> Parity:
    """Run the graph at `path` on `feeds_list` and hold each output to `references` (one list of outputs per
    feed, in `output_names` order); raise ParityError at the first one past the tolerance.

    Returns what the manifest records: the worst case (nearest its limit: the lowest PSNR where a floor is set,
    else the largest error over limit) and the tolerance it was held to."""
    got = run_graph(path, feeds_list, ort_options, files, output_names)
    labels = labels or [""] * len(feeds_list)
    worst: dict = {"max_abs_err": 0.0, "limit": 0.0, "output": None}
    worst_margin = math.inf
    for label, expected, outs in zip(labels, references, got):
        for output, ref, g in zip(output_names, expected, outs):
            result = _compare(check, output, ref, g, label)
            margin = result.get("psnr_db", 1 - result["max_abs_err"] / max(result["limit"], 1e-30))
            if margin <= worst_margin:
                worst, worst_margin = result, margin
    return Parity(**worst, relative_tolerance=check.tolerance.relative, min_psnr_db=check.tolerance.min_psnr_db)


def _compare(check: Check, output: str, reference: np.ndarray, got: np.ndarray, label: str) -> dict:
    where = f" at {label}" if label else ""
    if reference.shape != got.shape:
        raise ParityError(f"{check.name}.{output}: {check.subject} gives shape {got.shape}, {check.against} "
                          f"{reference.shape}{where}; not written")
    reference = reference.astype(np.float32, copy=False)
    err = float(np.max(np.abs(reference - got.astype(np.float32))))
    tolerance = check.tolerance
    limit = tolerance.limit(float(np.max(np.abs(reference))))
    result: dict = {"max_abs_err": err, "limit": limit}
    psnr_text = ""
    if tolerance.min_psnr_db is not None:
        result["psnr_db"] = psnr = psnr_db(reference, got)
        psnr_text = f", PSNR {psnr:.1f} dB (floor {tolerance.min_psnr_db:g} dB)"
    if not (err <= limit and result.get("psnr_db", math.inf) >= (tolerance.min_psnr_db or -math.inf)):
        raise ParityError(f"{check.name}.{output}: {check.subject} differs from {check.against} by {err:.3g} "
                          f"(limit {limit:.3g}){psnr_text}{where}; not written")
    return {**result, "output": output}
