"""`edgediff export --clip-skip N`: the text encoder's graph outputs the hidden state diffusers' clip_skip=N takes
(SD: hidden_states[-(N + 1)] through the final layer norm), and renders match diffusers with clip_skip=N."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from conftest import NEGATIVES, PROMPTS, H, W, diffusers_pipeline  # noqa: E402
from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def skipped(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_skip") / "bundle"
    r = CliRunner().invoke(main, ["export", str(checkpoint("sd1")), str(out), "--clip-skip", "1"])
    assert r.exit_code == 0, r.output
    ref = diffusers_pipeline("StableDiffusionPipeline", checkpoint("sd1"))
    # diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm, which transformers 5 flattened into
    # the model itself; the alias (unregistered, so no module cycle) lets diffusers' own code run unchanged.
    if not hasattr(ref.text_encoder, "text_model"):
        object.__setattr__(ref.text_encoder, "text_model", ref.text_encoder)
    return out, Pipeline.load(out), ref


def test_manifest_records_the_skip(skipped):
    out, _, _ = skipped
    (encoder,) = json.loads((out / "manifest.json").read_text())["text_encoders"]
    assert (encoder["layer"], encoder["final_layer_norm"], encoder["clip_skip"]) == (-2, True, 1)
    assert encoder["output"] == "hidden_state"


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_clip_skip_matches_diffusers(skipped, guidance):
    _, ours, ref = skipped
    latents = torch.randn(len(PROMPTS), 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    kw = dict(num_inference_steps=3, guidance_scale=guidance, height=H, width=W, output_type="np")
    extra = {}
    if guidance > 1:
        # diffusers applies clip_skip to the prompt only and encodes negatives with the last layer; a bundle's
        # encoder has one layer for both, so the reference is given negatives encoded with the skip too.
        extra["negative_prompt_embeds"] = ref.encode_prompt(NEGATIVES, "cpu", 1, False, clip_skip=1)[0]
    expected = ref(PROMPTS, latents=latents, clip_skip=1, **kw, **extra).images
    got = ours(PROMPTS, latents=latents.numpy(), sampler="euler", negative_prompt=NEGATIVES, **kw).images
    assert expected.std() > 0.05
    assert float(np.abs(got - expected).max()) <= TOLERANCE
    # and the skip matters: without it diffusers draws another image
    plain = ref(PROMPTS, latents=latents, **kw, **extra).images
    assert float(np.abs(plain - expected).max()) > 10 * TOLERANCE


def test_too_deep_a_skip_is_one_clear_line(checkpoint, tmp_path):
    r = CliRunner().invoke(main, ["export", str(checkpoint("sd1")), str(tmp_path / "b"), "--clip-skip", "5"])
    assert r.exit_code == 2 and "--clip-skip 5" in r.output and "choose 0 to 1" in r.output
    assert not (tmp_path / "b").exists()
