"""A bundle whose decoder is an AutoencoderTiny (TAESD) renders what diffusers renders with that tiny VAE."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402
from conftest import H, W, diffusers_pipeline  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.export.checkpoint import SourceError  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402


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
