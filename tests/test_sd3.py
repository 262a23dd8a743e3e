"""SD3 / SD3.5 (MMDiT, CLIP-L + CLIP-G + T5, flow matching): exported with every component through the parity gate,
and the same images as diffusers' StableDiffusion3Pipeline and StableDiffusion3Img2ImgPipeline by seed (pixels in
0..1 within 2e-3), with and without T5, with CFG and negative prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from conftest import NEGATIVES, PROMPTS  # noqa: E402
from flow_parity import assert_same_image, init_image, reference  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.cli import main  # noqa: E402
from edgediff.export.checkpoint import SourceError  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402


@pytest.fixture(scope="module")
def sd3(bundle, checkpoint):
    loaded = {}

    def get(family, cls="StableDiffusion3Pipeline"):
        if (family, cls) not in loaded:
            extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3_no_t5" else {}
            loaded[family, cls] = (Pipeline.load(bundle(family)), reference(cls, checkpoint(family), **extra))
        return loaded[family, cls]

    return get


def test_manifest_records_the_encoders_t5_length_schedule_and_licence(bundle):
    m = json.loads((bundle("sd3") / "manifest.json").read_text())
    assert (m["family"], m["prediction_type"], m["provenance"]["licence"]) == ("sd3", "flow", "other")
    assert [(e["component"], e.get("pooled_output"), e["layer"]) for e in m["text_encoders"]] == [
        ("text_encoder", "text_embeds", -2), ("text_encoder_2", "text_embeds", -2),
        ("text_encoder_3", None, -1)]
    assert m["tokenizers"]["tokenizer_3"]["max_length"] == 256  # SD3's max_sequence_length, not T5's own 512
    assert m["transformer"] == {"max_sequence_length": 256, "joint_attention_dim": 48, "guidance_embeds": False,
                                "max_side": 32 * 2 * 8}  # pos_embed_max_size patches of 2 latent pixels
    assert (m["scheduler"]["shift"], m["scheduler"]["use_dynamic_shifting"]) == (3.0, False)
    assert m["defaults"] | {"height": 0, "width": 0} == {"sampler": "flow_euler", "schedule": "flow_shift",
                                                        "steps": 28, "guidance_scale": 7.0, "height": 0, "width": 0}
    # the transformer's text axis: CLIP's 77 tokens, then T5's 256
    assert m["components"]["transformer"]["axes"]["sequence"]["opt"] == 77 + 256
    assert {c["parity"]["against"] for c in m["components"].values()} == {"pytorch"}


def test_a_hand_edited_flow_schedule_is_refused_in_one_line(bundle_copy):
    from edgediff.bundle import BundleError, read_manifest

    root = bundle_copy("sd3")
    m = json.loads((root / "manifest.json").read_text())
    for change, field in (({"shift": 0}, "scheduler.shift"), ({"max_image_seq_len": 256}, "base_image_seq_len")):
        (root / "manifest.json").write_text(json.dumps({**m, "scheduler": {**m["scheduler"], **change}}))
        with pytest.raises(BundleError, match=field):
            read_manifest(root)


def test_a_size_past_the_position_embedding_is_refused_in_one_line(sd3):
    from edgediff.runtime.plan import RenderError

    ours, _ = sd3("sd3")
    with pytest.raises(RenderError, match="reaches 512 pixels a side"):
        ours("a cat", height=512, width=528, num_inference_steps=1)


def test_the_bundle_is_plain_onnx(bundle):
    """Attention exports as MatMul / Softmax, no onnxruntime contrib operators (the lead's decision)."""
    import onnx

    graph = onnx.load(str(bundle("sd3") / "transformer" / "model.onnx"), load_external_data=False).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    assert {"MatMul", "Softmax"} <= {n.op_type for n in graph.node}


def test_sd3_with_t5_cfg_and_negatives_matches_diffusers(sd3):
    ours, ref = sd3("sd3")
    assert_same_image(ours, ref, PROMPTS, negative_prompt=NEGATIVES, guidance_scale=5.0, num_inference_steps=3)


def test_sd3_without_t5_feeds_zeros_as_diffusers_does(sd3):
    ours, ref = sd3("sd3_no_t5")
    assert "text_encoder_3" not in ours.manifest.components
    got = assert_same_image(ours, ref, PROMPTS[0], guidance_scale=5.0, num_inference_steps=2,
                            num_images_per_prompt=2)
    with_t5, _ = sd3("sd3")
    # same weights but T5: a different image, so that T5's tokens demonstrably reach the transformer
    other = with_t5(PROMPTS[0], guidance_scale=5.0, num_inference_steps=2, height=got.shape[1],
                    width=got.shape[2], output_type="np", seed=5, num_images_per_prompt=2).images
    assert np.abs(other - got).max() > 1e-2


def test_sd3_img2img_matches_diffusers(sd3):
    ours, ref = sd3("sd3", "StableDiffusion3Img2ImgPipeline")
    # strength 0.6 of 4 steps: diffusers' flow pipelines start at step int(4 - 2.4) = 1, not 4 - int(2.4) = 2
    assert_same_image(ours, ref, PROMPTS[1], image=init_image(), strength=0.6, num_inference_steps=4,
                      guidance_scale=4.0, negative_prompt="blurry")


def test_t5_truncation_is_reported_at_its_own_length(sd3):
    ours, _ = sd3("sd3")
    words = " ".join(["red cat"] * 140)  # 280 words: past CLIP's 77 tokens and T5's 256
    out = ours(words, num_inference_steps=1, guidance_scale=0.0, height=32,
               width=32, output_type="np")
    lengths = sorted(int(w.split()[3]) for w in out.warnings if w.startswith("prompt truncated"))
    assert lengths == [77, 256], out.warnings


@pytest.mark.parametrize("option, message", [
    ({"loras": ["x.safetensors"]}, "--lora: not yet for sd3 bundles"),
    ({"preset": "lcm"}, "--preset lcm: not for sd3 models"),
])
def test_options_not_yet_carried_over_are_refused_in_one_line(checkpoint, tmp_path, option, message):
    if "loras" in option:
        from safetensors.torch import save_file

        save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 16),
                   "transformer.proj_out.lora_B.weight": torch.zeros(64, 2)}, tmp_path / "x.safetensors")
        option = {"loras": [str(tmp_path / "x.safetensors")]}
    with pytest.raises(SourceError) as e:
        export_bundle(checkpoint("sd3"), tmp_path / "out", **option)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_info_and_samplers_know_sd3(bundle):
    info = CliRunner().invoke(main, ["info", str(bundle("sd3"))])
    assert info.exit_code == 0, info.output
    assert "sd3" in info.output and "flow_euler" in info.output and "T5" in info.output
    samplers = CliRunner().invoke(main, ["samplers"])
    assert "SD3" in samplers.output and "FLUX.1-schnell" in samplers.output


def test_clip_skip_takes_the_layer_diffusers_takes(checkpoint, tmp_path):
    out = tmp_path / "skip1"
    export_bundle(checkpoint("sd3"), out, clip_skip=1)
    assert [e.layer for e in Pipeline.load(out).manifest.text_encoders[:2]] == [-3, -3]
    # diffusers skips layers for the prompt only (its negatives take the default layer): compared without CFG
    assert_same_image(Pipeline.load(out), reference("StableDiffusion3Pipeline", checkpoint("sd3")), PROMPTS[0],
                      guidance_scale=0.0, num_inference_steps=2, ref_kw={"clip_skip": 1})


def test_the_bench_peer_loads_sd3_without_t5(checkpoint):
    """diffusers' from_pretrained does not pass a component that model_index.json lists as null (SD3 without T5):
    the bench's diffusers worker passes it as None, and the pipeline renders."""
    from edgediff.bench.worker import load_diffusers

    render, versions = load_diffusers({"model": str(checkpoint("sd3_no_t5")), "threads": 1, "sampler": "flow_euler"})
    timed = render({"prompt": "a red cat", "steps": 1, "guidance": 7.0, "height": 32, "width": 32, "batch": 1,
                    "seed": 0})
    assert timed["total"] > 0 and "diffusers" in versions


@pytest.mark.parametrize("family", ["sd3", "flux_dev"])
def test_fp16_keeps_t5_and_the_transformer_fp32_outside_their_linears(checkpoint, bundle, tmp_path, family):
    """fp16 bundles of the transformer families: only the linear layers' weights are fp16 in T5 and the MMDiT (T5's
    feed-forward output projections stay fp32, as transformers keeps them), the manifest says so, and the render
    stays close to the fp32 bundle's."""
    import onnx

    from edgediff.export.precision import T5_FEED_FORWARD_OUT

    out = tmp_path / "fp16"
    export_bundle(checkpoint(family), out, precision="fp16")
    manifest = json.loads((out / "manifest.json").read_text())
    t5 = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    for name in ("transformer", t5):
        c = manifest["components"][name]
        assert c["precision"] == "fp16" and "everything but the linear layers" in c["conversion"]["fp32_islands"]
        model = onnx.load(str(out / c["file"]))
        weights = {t.name: t.data_type for t in model.graph.initializer}
        linears = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        half = [n for n in linears if weights[n.input[1]] == onnx.TensorProto.FLOAT16]
        assert half, name
        kept = [n for n in linears if weights[n.input[1]] == onnx.TensorProto.FLOAT]
        assert all(T5_FEED_FORWARD_OUT in n.name for n in kept), (name, [n.name for n in kept][:3])
        if name == t5:
            assert kept  # the wo projections
        typed = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
        norms = [n.output[0] for n in typed.graph.node if n.op_type in ("LayerNormalization", "Softmax", "Add")]
        assert norms and not [o for o in norms if types.get(o) == onnx.TensorProto.FLOAT16], name
    render = dict(num_inference_steps=2, height=32, width=48, seed=3, output_type="np")
    fp16 = Pipeline.load(out)("a red cat", **render).images
    fp32 = Pipeline.load(bundle(family))("a red cat", **render).images
    from edgediff.export.gate import psnr_db

    # measured 67 dB (SD3) and 72 dB (FLUX.1-dev); 35 dB for FLUX while the converter still rounded the tensors
    # between fp32 nodes to fp16 (precision.drop_fp16_round_trips)
    assert psnr_db(fp32, fp16) >= 50.0
    assert np.abs(fp16 - fp32).max() <= 2e-2  # as the U-Net families' fp16 bundles (test_precision.py)
