"""Nearest 2x upsampling + 3x3 convolution folded into four phase convolutions (export/upsample.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgediff.export.upsample import fold_upsampling_convs


class Upsampler(torch.nn.Module):
    """diffusers' Upsample2D as the VAE decoder and the U-Net run it, plus a bilinear one that must stay."""

    def __init__(self, bias: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
        self.other = torch.nn.Conv2d(5, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.other(torch.nn.functional.interpolate(y, scale_factor=2.0, mode="bilinear"))


def _exported(module: torch.nn.Module, tmp_path) -> onnx.ModelProto:
    path = tmp_path / "model.onnx"
    torch.onnx.export(module, (torch.zeros(1, 6, 5, 7),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    return onnx.load(str(path))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("bias", [True, False])
def test_the_folded_graph_computes_what_torch_does_at_any_size(tmp_path, bias):
    torch.manual_seed(0)
    module = Upsampler(bias).eval()
    model = _exported(module, tmp_path)
    assert fold_upsampling_convs(model) == 1  # the nearest one; the bilinear Resize stays
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Resize") == 1 and ops.count("DepthToSpace") == 1 and ops.count("Conv") == 5
    read = {name for n in model.graph.node for name in n.input}
    assert all(n.output[0] in read for n in model.graph.node if n.op_type == "Constant")  # no stray scales left
    onnx.checker.check_model(model)
    for shape in [(1, 6, 5, 7), (2, 6, 8, 3)]:  # odd and even sizes: the phases' padding at every border
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(_run(model, x.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_a_lora_target_is_left_as_it_is(tmp_path):
    model = _exported(Upsampler(bias=True).eval(), tmp_path)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert fold_upsampling_convs(model, keep={conv.input[1]}) == 0
    assert conv.input[1] in {t.name for t in model.graph.initializer}


def test_exported_decoders_carry_the_folded_form_and_lora_targets_do_not(bundle):
    """The tiny SD bundle's VAE decoder upsamples through DepthToSpace (and its export gate held); the U-Net's
    upsampling convolutions are run-time LoRA targets, patched by name, so they stay as exported."""
    root = bundle("sd1")
    ops = [n.op_type for n in onnx.load(str(root / "vae_decoder" / "model.onnx"), load_external_data=False).graph.node]
    assert "DepthToSpace" in ops and "Resize" not in ops
    unet = onnx.load(str(root / "unet" / "model.onnx"), load_external_data=False)
    assert "DepthToSpace" not in [n.op_type for n in unet.graph.node]
    assert "upsamplers.0.conv" in (root / "unet" / "lora_map.json").read_text()
