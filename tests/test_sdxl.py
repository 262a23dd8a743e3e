"""SDXL (two text encoders, pooled + size conditioning) and SDXL with LCM: the same image as diffusers'
StableDiffusionXLPipeline (pixels in 0..1, max abs error <= 2e-3), and the command line end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from conftest import NEGATIVES, PROMPTS, H, W, diffusers_pipeline  # noqa: E402
from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402
from PIL import Image  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def pipes(bundle, checkpoint):
    loaded = {}

    def get(family):
        if family not in loaded:
            ref = diffusers_pipeline("StableDiffusionXLPipeline", checkpoint(family), scheduler=None)
            loaded[family] = (Pipeline.load(bundle(family)), ref)
        return loaded[family]

    return get


def _latents(n=None):
    n = len(PROMPTS) if n is None else n
    return torch.randn(n, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))


def test_manifest_records_both_encoders_and_the_added_conditions(bundle):
    m = json.loads((bundle("sdxl") / "manifest.json").read_text())
    assert m["family"] == "sdxl" and m["tokenizers"]["tokenizer_2"]["path"] == "tokenizer_2"
    first, second = m["text_encoders"]
    assert (first["component"], first["layer"], first["final_layer_norm"]) == ("text_encoder", -2, False)
    assert (second["component"], second["pooled_output"]) == ("text_encoder_2", "text_embeds")
    assert m["added_conditions"]["force_zeros_for_empty_prompt"] is True
    assert [t["name"] for t in m["components"]["unet"]["inputs"]] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]


@pytest.mark.parametrize("negative", [NEGATIVES, None, ""], ids=["negatives", "none-zeros", "empty-string"])
def test_sdxl_matches_diffusers_given_latents(pipes, negative):
    ours, ref = pipes("sdxl")
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=H, width=W, negative_prompt=negative, output_type="np")
    expected = ref(PROMPTS, latents=_latents(), **kw).images
    got = ours(PROMPTS, latents=_latents().numpy(), sampler="euler", **kw).images
    assert expected.std() > 0.05  # a real picture, not a flat field that would match anything
    err = float(np.abs(got - expected).max())
    assert err <= TOLERANCE, err


def test_zero_negative_differs_from_an_encoded_empty_one(pipes):
    ours, _ = pipes("sdxl")
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=H, width=W, seed=1, output_type="np")
    assert np.abs(ours("a cat", **kw).images - ours("a cat", negative_prompt="", **kw).images).max() > 1e-3


def test_sdxl_lcm_matches_diffusers(pipes):
    ours, ref = pipes("sdxl_lcm")
    kw = dict(guidance_scale=8.0, height=H, width=W, output_type="np")
    one = ref(PROMPTS, num_inference_steps=1, latents=_latents(), **kw).images
    got = ours(PROMPTS, num_inference_steps=1, latents=_latents().numpy(), **kw).images
    assert float(np.abs(got - one).max()) <= TOLERANCE
    # several steps draw LCM's per-step noise from the seed's stream, as diffusers does
    seeded = ref(PROMPTS, num_inference_steps=4, num_images_per_prompt=2, generator=torch.Generator().manual_seed(11),
                 **kw).images
    got = ours(PROMPTS, num_inference_steps=4, num_images_per_prompt=2, seed=11, **kw).images
    assert got.shape == (4, H, W, 3)
    assert float(np.abs(got - seeded).max()) <= TOLERANCE


def test_sdxl_export_info_render_from_the_command_line(checkpoint, tmp_path):
    out = tmp_path / "bundle"

    def run(*args):
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    run("export", checkpoint("sdxl"), out, "--preset", "turbo")
    assert "sdxl, preset turbo" in run("info", out)
    png = tmp_path / "cat.png"
    run("render", "a red cat", "-m", out, "-o", png, "--size", "48x32", "--steps", "2")
    with Image.open(png) as im:
        assert im.size == (48, 32)


def test_sdxl_unet_exports_with_external_data(checkpoint, tmp_path, monkeypatch):
    """A full-size SDXL U-Net (10 GB in fp32) is past protobuf's 2 GiB: its weights must go to model.onnx.data.
    The tiny one takes the same path with the threshold lowered, and still passes the parity gate."""
    from edgediff.export import onnx as export_onnx
    from edgediff.export.checkpoint import Checkpoint
    from edgediff.export.convert import _gate_shapes
    from edgediff.export.specs import unet_spec

    monkeypatch.setattr(export_onnx, "EXTERNAL_DATA_THRESHOLD", 0)
    ck = Checkpoint.open(checkpoint("sdxl"))
    unet = ck.load("unet")
    spec = unet_spec(unet)
    trace, gates = _gate_shapes(ck)
    path = tmp_path / "unet" / "model.onnx"
    written, options = export_onnx.export_component(unet, spec, trace, path)
    assert written == [path, path.with_name("model.onnx.data")]
    assert path.stat().st_size < path.with_name("model.onnx.data").stat().st_size
    references = export_onnx.reference_outputs(unet, spec, gates)
    assert export_onnx.check_against_torch(spec, path, references, ort_options=options).max_abs_err < 1e-4


def test_fp16_sdxl_keeps_its_vae_in_fp32_unless_it_is_fp16_safe(checkpoint, bundle, tmp_path):
    """SDXL's VAE overflows in fp16 (diffusers upcasts it): a fp16 bundle keeps it fp32 and says why, and still
    renders close to the fp32 bundle; a VAE whose config says force_upcast false is converted."""
    import dataclasses

    from edgediff.bundle import read_manifest
    from edgediff.export.checkpoint import Checkpoint
    from edgediff.export.convert import export_bundle, kept_fp32

    out = tmp_path / "fp16"
    export_bundle(checkpoint("sdxl"), out, precision="fp16")
    m = read_manifest(out)
    assert {n: c.precision for n, c in m.components.items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}
    assert set(m.provenance.kept_fp32) == {"vae_decoder", "vae_encoder"}
    render = dict(num_inference_steps=2, height=H, width=W, seed=1, output_type="np")
    fp16 = Pipeline.load(out)(PROMPTS[0], **render).images
    fp32 = Pipeline.load(bundle("sdxl"))(PROMPTS[0], **render).images
    assert np.abs(fp16 - fp32).max() < 2e-2

    ck = Checkpoint.open(checkpoint("sdxl"))
    safe = dataclasses.replace(ck, vae_config={**ck.vae_config, "force_upcast": False})
    assert kept_fp32(safe, "fp16", None) == {} and kept_fp32(ck, "int8", None) == {}
    assert set(kept_fp32(ck, "fp16", "taesdxl")) == {"vae_encoder"}  # the tiny decoder is fp16-safe


def test_int8_sdxl_bundle_renders_with_quantized_unet(checkpoint, tmp_path):
    from edgediff.bundle import read_manifest
    from edgediff.export.calibrate import Calibration
    from edgediff.export.convert import export_bundle

    out = tmp_path / "int8"
    export_bundle(checkpoint("sdxl"), out, precision="int8",
                  calibration=Calibration(prompts=("a red cat", "a blue house", "a green tree"), steps=2, size=32))
    m = read_manifest(out)
    assert m.components["unet"].precision == "int8" and m.components["unet"].conversion.quantized_layers > 0
    image = Pipeline.load(out)(PROMPTS[0], num_inference_steps=2, height=H, width=W, seed=1, output_type="np").images
    assert image.shape == (1, H, W, 3) and np.isfinite(image).all() and image.std() > 0.01


def test_sdxl_image_to_image_matches_diffusers_by_seed(pipes, checkpoint):
    ours, _ = pipes("sdxl")
    ref = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline", checkpoint("sdxl"),
                             requires_aesthetics_score=False)
    rng = np.random.default_rng(0)
    init = (rng.random((H, W, 3)) * 0.6 + np.linspace(0, 0.4, W)[None, :, None]) * 255
    image = Image.fromarray(init.round().astype(np.uint8))
    kw = dict(image=image, strength=0.6, num_inference_steps=5, guidance_scale=5.0, output_type="np")
    expected = ref(PROMPTS[0], generator=torch.Generator().manual_seed(4), **kw).images
    got = ours(PROMPTS[0], seed=4, sampler="euler", **kw)
    assert len(got.timings["steps"]) == 3
    assert float(np.abs(got.images - expected).max()) <= TOLERANCE
