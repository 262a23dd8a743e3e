"""benchmarks/t5_whole.py at a small width: T5's encoder exported in pieces is the whole encoder, and the pieces
stitched into one graph compute exactly what the chain of pieces computes (the way T5-XXL's 24 layers were
measured on a machine where its fp32 export does not fit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "t5_whole.py"
ENV = {**os.environ, "T5_LAYERS_WIDTH": "16"}  # d_model 256, 4 heads, d_ff 640


def _script(*args: str) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5-pieces")
    _script("export", str(out), "--pieces", "2", "--layers", "4", "--sequence", "64")
    _script("stitch", str(out))
    _script("time", str(out), "--runs", "1", "--sequence", "64", "--json", str(out / "figures.json"))
    return out, json.loads((out / "figures.json").read_text())["timings"]


def test_the_chain_of_pieces_is_one_t5_encoder(measured, monkeypatch):
    """Piece k's blocks placed after piece k - 1's in one T5EncoderModel give PyTorch's chain output."""
    import torch
    from transformers import T5EncoderModel

    out, _ = measured
    monkeypatch.setenv("T5_LAYERS_WIDTH", "16")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import t5_layers

    assert t5_layers.SHRINK == 16, "t5_layers was imported at full width before this test"  # 19 GB otherwise
    pieces = []
    for k in range(2):
        torch.manual_seed(k)
        pieces.append(T5EncoderModel(t5_layers._config(2)).eval())
    whole = T5EncoderModel(t5_layers._config(4)).eval()
    with torch.no_grad():
        whole.encoder.embed_tokens.weight.copy_(pieces[0].encoder.embed_tokens.weight)
        for i, block in enumerate(whole.encoder.block):
            block.load_state_dict(pieces[i // 2].encoder.block[i % 2].state_dict(), strict=False)
        whole.encoder.final_layer_norm.load_state_dict(pieces[1].encoder.final_layer_norm.state_dict())
        ids = torch.from_numpy(np.load(out / "flow" / "heldout-64-ids.npy"))
        expected = whole(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_array_equal(np.load(out / "flow" / "heldout-64-torch-2.npy"), expected)


def test_stitched_graphs_compute_what_the_chain_computes(measured):
    _, timings = measured
    assert timings["fp32"]["64"]["psnr_db"] > 100  # the ONNX chain against PyTorch's
    for precision, floor in (("int8", 30), ("int4", 20)):
        assert timings[precision]["64"]["psnr_db"] > floor
        runs = [run for run in timings if run.startswith(f"{precision} whole")]
        assert len(runs) == 4  # normal, low, the runtime's first load and its cached one
        for run in runs:
            assert timings[run]["64"]["differs_from_chain"] == 0.0, run
