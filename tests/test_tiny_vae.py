"""A bundle whose decoder is an AutoencoderTiny (TAESD) renders what diffusers renders with that tiny VAE."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402
from conftest import H, W, diffusers_pipeline  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.export.checkpoint import SourceError  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402
from edgediff.export.specs import TINY_ENCODER_LOGVAR  # noqa: E402


def _tiny_vae(folder, latent_channels=4):
    torch.manual_seed(1)
    vae = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=latent_channels,
    )
    vae.save_pretrained(folder)
    return folder


def test_tiny_vae_bundle_renders_like_diffusers(checkpoint, tmp_path):
    taesd = _tiny_vae(tmp_path / "taesd")
    out = tmp_path / "bundle"
    manifest = export_bundle(checkpoint("sd1"), out, tiny_vae=taesd)
    assert manifest.provenance.vae_decoder.startswith("AutoencoderTiny")
    ref = diffusers_pipeline("StableDiffusionPipeline", checkpoint("sd1"),
                             vae=diffusers.AutoencoderTiny.from_pretrained(taesd))
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=H, width=W, output_type="np")
    prompts = ["a red cat", "a blue dog"]
    expected = ref(prompts, latents=latents, **kw).images
    got = Pipeline.load(out)(prompts, latents=latents.numpy(), sampler="euler", **kw).images
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_tiny_vae_for_other_latents_is_refused(checkpoint, tmp_path):
    with pytest.raises(SourceError, match="16-channel latents"):
        export_bundle(checkpoint("sd1"), tmp_path / "out", tiny_vae=_tiny_vae(tmp_path / "taef1", 16))
    assert not (tmp_path / "out").exists()


def test_tiny_vae_sdxl_bundle_renders_like_diffusers(checkpoint, tmp_path):
    """TAESDXL in an SDXL bundle: the SDXL VAE's scaling factor (0.13025) is converted into the tiny VAE's (1.0)."""
    taesdxl = _tiny_vae(tmp_path / "taesdxl")
    out = tmp_path / "bundle"
    export_bundle(checkpoint("sdxl"), out, tiny_vae=taesdxl)
    ref = diffusers_pipeline("StableDiffusionXLPipeline", checkpoint("sdxl"),
                             vae=diffusers.AutoencoderTiny.from_pretrained(taesdxl))
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=H, width=W, output_type="np")
    expected = ref("a red cat", latents=latents, **kw).images
    got = Pipeline.load(out)("a red cat", latents=latents.numpy(), sampler="euler", **kw).images
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def test_checkpoint_whose_own_vae_is_tiny(checkpoint, tmp_path):
    """SDXS ships TAESD as the checkpoint's own `vae`: the bundle decodes as diffusers does with it, and its encoder
    gives the tiny VAE's deterministic latents as the mean, with a log-variance the runtime reads as no noise."""
    src = tmp_path / "sdxs-like"
    shutil.copytree(checkpoint("sd1"), src)
    shutil.rmtree(src / "vae")
    _tiny_vae(src / "vae")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderTiny"]}))
    out = tmp_path / "bundle"
    manifest = export_bundle(src, out, preset="turbo")
    assert manifest.latent.scaling_factor == 1.0
    ref = diffusers_pipeline("StableDiffusionPipeline", src)
    assert type(ref.vae).__name__ == "AutoencoderTiny"
    # the turbo preset's schedule: one step from the last training timestep
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=1, guidance_scale=0.0, height=H, width=W, output_type="np")
    expected = ref("a red cat", latents=latents, **kw).images
    got = Pipeline.load(out)("a red cat", latents=latents.numpy(), **kw).images
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)

    import onnxruntime as ort

    pixels = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4)) * 2 - 1
    session = ort.InferenceSession(str(out / "vae_encoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    mean, logvar = np.split(session.run(None, {"sample": pixels.numpy()})[0], 2, axis=1)
    with torch.no_grad():
        np.testing.assert_allclose(mean, ref.vae.encode(pixels).latents.numpy(), atol=1e-4, rtol=0)
    assert (logvar == TINY_ENCODER_LOGVAR).all()
