"""FLUX.1 dev and schnell (MMDiT on packed latents, rotary position ids, CLIP pooled + T5, dynamic-shift flow
matching): the same images as diffusers' FluxPipeline and FluxImg2ImgPipeline by seed (pixels within 2e-3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flow_parity import assert_same_image, init_image, reference  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.runtime.families.flux import UNUSED_NEGATIVE, image_ids, pack, unpack  # noqa: E402
from edgediff.runtime.plan import RenderError, build_schedule  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture(scope="module")
def flux(bundle, checkpoint):
    loaded = {}

    def get(family, cls="FluxPipeline"):
        if (family, cls) not in loaded:
            ours = Pipeline.load(bundle(family))
            loaded[family, cls] = (ours, reference(cls, checkpoint(family)))
        return loaded[family, cls]

    return get


def _t5_length(ours) -> dict:
    """diffusers' FluxPipeline pads T5 to 512 unless told; schnell's model card renders with 256, as the bundle."""
    return {"max_sequence_length": ours.manifest.transformer.max_sequence_length}


def test_packing_and_position_ids_are_diffusers(flux):
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = diffusers.FluxPipeline._pack_latents(latents, 2, 4, 6, 10).numpy()
    np.testing.assert_array_equal(pack(latents.numpy()), packed)
    np.testing.assert_array_equal(unpack(packed, 6, 10), latents.numpy())
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(6, 10), ids)


def test_manifests_tell_dev_from_schnell(bundle):
    dev, schnell = (json.loads((bundle(f) / "manifest.json").read_text()) for f in ("flux_dev", "flux_schnell"))
    assert dev["transformer"]["guidance_embeds"] and not schnell["transformer"]["guidance_embeds"]
    assert (dev["tokenizers"]["tokenizer_2"]["max_length"], schnell["tokenizers"]["tokenizer_2"]["max_length"]) == (
        512, 256)
    assert (dev["preset"], dev["defaults"]["steps"], dev["defaults"]["guidance_scale"]) == ("standard", 28, 3.5)
    assert (schnell["preset"], schnell["defaults"]["steps"], schnell["defaults"]["guidance_scale"]) == ("turbo", 4, 0)
    assert dev["defaults"]["schedule"] == "flow_dynamic" and dev["scheduler"]["use_dynamic_shifting"]
    assert dev["provenance"]["licence"] == "flux-1-dev-non-commercial-license"
    assert [t["name"] for t in dev["components"]["transformer"]["inputs"]] == [
        "hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids", "guidance"]
    assert "guidance" not in [t["name"] for t in schnell["components"]["transformer"]["inputs"]]


def test_schnell_at_its_preset_4_steps_matches_diffusers(flux):
    ours, ref = flux("flux_schnell")
    plan = ours.plan()
    assert (plan.steps, plan.guidance_scale) == (4, 0.0)
    assert_same_image(ours, ref, [PROMPT, "a green tree"], num_inference_steps=4, guidance_scale=0.0,
                      ref_kw=_t5_length(ours))


@pytest.mark.parametrize("size", [(32, 48), (64, 32)], ids=["32x48", "64x32"])
def test_dev_with_its_guidance_embedding_matches_diffusers_at_non_square_sizes(flux, size):
    ours, ref = flux("flux_dev")
    height, width = size
    assert_same_image(ours, ref, PROMPT, height=height, width=width, num_inference_steps=3, guidance_scale=3.5,
                      num_images_per_prompt=2, ref_kw=_t5_length(ours))


def test_dynamic_shift_follows_the_image_size(flux):
    ours, _ = flux("flux_dev")
    small, large = (build_schedule(ours.manifest, ours.plan(height=h, width=w, steps=3)) for h, w in ((32, 48),
                                                                                                       (64, 32)))
    assert small.sigmas[1] < large.sigmas[1]  # more latent tokens, a larger mu, later steps at more noise


def test_true_cfg_with_a_negative_prompt_matches_diffusers(flux):
    ours, ref = flux("flux_dev")
    assert_same_image(ours, ref, PROMPT, negative_prompt="blurry", true_cfg_scale=2.0, guidance_scale=3.5,
                      num_inference_steps=2, ref_kw=_t5_length(ours))


def test_negative_prompt_without_true_cfg_is_unused_and_said_so(flux):
    ours, _ = flux("flux_dev")
    kw = dict(num_inference_steps=1, height=32, width=32, output_type="np", seed=1)
    plain = ours(PROMPT, **kw)
    negative = ours(PROMPT, negative_prompt="blurry", **kw)
    assert UNUSED_NEGATIVE in negative.warnings and UNUSED_NEGATIVE not in plain.warnings
    np.testing.assert_array_equal(plain.images, negative.images)


def test_true_cfg_is_flux_only(bundle):
    with pytest.raises(RenderError, match="true_cfg_scale is FLUX's"):
        Pipeline.load(bundle("sd3"))("a cat", true_cfg_scale=2.0, num_inference_steps=1)


def test_dev_img2img_matches_diffusers(flux):
    ours, ref = flux("flux_dev", "FluxImg2ImgPipeline")
    assert_same_image(ours, ref, PROMPT, image=init_image(), strength=0.5, num_inference_steps=4, guidance_scale=3.5,
                      ref_kw=_t5_length(ours))


def test_low_memory_renders_the_same_and_the_estimate_counts_the_transformer(flux):
    from edgediff.runtime import memory

    ours, _ = flux("flux_dev")
    kw = dict(num_inference_steps=2, height=32, width=48, output_type="np", seed=3)
    low = Pipeline.load(ours.root, memory="low")
    # low memory loads without pre-packed weights: the same sums, not always in the same order
    np.testing.assert_allclose(low(PROMPT, **kw).images, ours(PROMPT, **kw).images, atol=1e-5)
    plan = ours.plan(height=1024, width=1024)
    stages = memory.render_stages(ours.manifest, plan, images=1, cfg=False, img2img=False)
    transformer = next(s for s in stages if s.component == "transformer")
    assert transformer.weights > 0 and transformer.activations > 0
    # 4096 image patches + 512 T5 + 77 tokens attend together: gigabytes at 1024^2, not exabytes
    assert 1 << 30 < memory.bytes_needed(ours.manifest, plan, images=1, cfg=False, img2img=False,
                                         memory="low") < 64 << 30


def test_int8_transformer_renders_close_to_fp32(checkpoint, bundle, tmp_path):
    """int8 QDQ for the transformer, T5 and the VAE decoder (CLIP stays fp32), calibrated on the fp32 bundle's own
    trajectories and gated against its graphs; still plain ONNX (QuantizeLinear / DequantizeLinear)."""
    import onnx

    from edgediff.export.calibrate import Calibration
    from edgediff.export.convert import export_bundle

    out = tmp_path / "int8"
    calibration = Calibration(prompts=("a red cat", "a blue dog in the snow", "a green tree"), steps=2, size=32)
    m = export_bundle(checkpoint("flux_dev"), out, precision="int8", calibration=calibration)
    assert {n: c.precision for n, c in m.components.items()} == {
        "text_encoder": "fp32", "text_encoder_2": "int8", "transformer": "int8", "vae_decoder": "int8",
        "vae_encoder": "fp32"}
    assert m.components["transformer"].parity.psnr_db > 30 and m.components["text_encoder_2"].parity.psnr_db > 30
    graph = onnx.load(str(out / "transformer" / "model.onnx"), load_external_data=False).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"} and "QuantizeLinear" in {n.op_type for n in graph.node}
    kw = dict(num_inference_steps=3, height=32, width=48, output_type="np", seed=2)
    int8, fp32 = (Pipeline.load(b)(PROMPT, **kw).images for b in (out, bundle("flux_dev")))
    assert 10 * np.log10(1 / np.mean((int8 - fp32) ** 2)) > 25  # measured 30.5 dB (T5's gate: 48.3 dB)


def test_bench_counts_the_transformer_and_t5(bundle):
    """`edgediff bench`'s FLOP counts: the transformer as the denoiser's step, at each graph's recorded text length
    (T5's 512 tokens), both text encoders in the text stage; more image tokens, more work."""
    from edgediff.bench.harness import Settings, _flops

    small, large = (_flops(bundle("flux_dev"), 1, Settings(width=w, height=h), cfg=False)
                    for w, h in ((32, 32), (64, 64)))
    assert all(n > 0 for n in small.values())
    assert large["unet_step"] > small["unet_step"] and large["text_encoder"] == small["text_encoder"]


def test_render_from_the_command_line_with_true_cfg(bundle, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from edgediff.cli import main

    png = tmp_path / "out.png"
    r = CliRunner().invoke(main, ["render", PROMPT, "-m", str(bundle("flux_dev")), "-o", str(png), "--size", "48x32",
                                  "--steps", "1", "--negative", "blurry", "--true-cfg", "2"])
    assert r.exit_code == 0, r.output
    with Image.open(png) as im:
        assert im.size == (48, 32) and "True CFG scale: 2" in im.text["parameters"]
