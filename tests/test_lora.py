"""LoRA fused at export renders what diffusers renders with the same LoRA loaded; bad sources get one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from click.testing import CliRunner  # noqa: E402
from conftest import PIXEL_TOLERANCE as TOLERANCE  # noqa: E402
from conftest import H, W, diffusers_pipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.cli import main  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402

RANK = 4
SCALE = 0.7


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1")


def _write_lora(pipeline_class, source, folder, encoders, targets=UNET_TARGETS, seed=0,
                encoder_projections=("q_proj", "v_proj")):
    """A random LoRA on a tiny pipeline's U-Net (`targets`: attention and resnet convs) and text encoders, in
    diffusers' format; returns the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline_class.from_pretrained(source, **({"safety_checker": None} if "safety_checker" in
                                                      pipeline_class._optional_components else {}))
    torch.manual_seed(seed)
    # lora_alpha = rank: the scale PEFT applies is then 1, whatever the file's metadata says
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(targets)))
    with torch.no_grad():
        for pname, p in pipe.unet.named_parameters():
            if "lora_" in pname:
                p.normal_(0, 0.2)  # PEFT starts B at zero: a LoRA that changes nothing would prove nothing
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}  # PEFT keys, as diffusers saves them now
    # transformers 5 wants a newer PEFT than the registry has for its own adapters: the text encoders' LoRA layers
    # are written directly, in the same format (diffusers loads them with PEFT's injection, not transformers')
    for encoder in encoders:
        width = getattr(pipe, encoder).config.hidden_size
        layers[f"{encoder}_lora_layers"] = {
            f"text_model.encoder.layers.{i}.self_attn.{proj}.lora_{part}.weight": torch.randn(shape) * 0.2
            for i in range(2) for proj in encoder_projections
            for part, shape in (("A", (RANK, width)), ("B", (width, RANK)))
        }
    pipeline_class.save_lora_weights(folder, **layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_files(checkpoint, tmp_path_factory):
    """The SD1 LoRA in both formats."""
    folder = tmp_path_factory.mktemp("lora")
    diffusers_file = _write_lora(diffusers.StableDiffusionPipeline, checkpoint("sd1"), folder, ["text_encoder"])
    kohya_file = to_kohya(diffusers_file, folder / "kohya.safetensors")
    # diffusers' older key style (".lora.down.weight"), which LoRAs on the hub still carry
    from diffusers.utils import convert_state_dict_to_diffusers

    old_file = folder / "old.safetensors"
    save_file(convert_state_dict_to_diffusers(load_file(diffusers_file)), old_file)
    return {"diffusers": diffusers_file, "kohya": kohya_file, "diffusers-old": old_file}


KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def to_kohya(diffusers_file, out, alpha=float(RANK), single_encoder=True):
    """The same LoRA in kohya's keys; with `alpha` below the rank, the up weights are scaled by rank / alpha so that
    every delta stays the same."""
    kohya = {}
    for key, value in load_file(diffusers_file).items():
        component, _, rest = key.partition(".")
        path, _, part = rest.rpartition(".lora.") if ".lora." in rest else rest.rpartition(".lora_")
        part = {"A.weight": "down.weight", "B.weight": "up.weight"}.get(part, part)
        prefix = "lora_te_" if single_encoder and component == "text_encoder" else KOHYA_PREFIXES[component]
        value = value * (RANK / alpha) if part == "up.weight" else value
        kohya[f"{prefix}{path.replace('.', '_')}.lora_{part}"] = value.contiguous()
        kohya[f"{prefix}{path.replace('.', '_')}.alpha"] = torch.tensor(float(alpha))
    save_file(kohya, out)
    return out


def test_sdxl_lora_on_the_unet_and_both_text_encoders_renders_like_diffusers(checkpoint, tmp_path):
    lora = _write_lora(diffusers.StableDiffusionXLPipeline, checkpoint("sdxl"), tmp_path,
                       ["text_encoder", "text_encoder_2"])
    out = tmp_path / "bundle"
    manifest = export_bundle(checkpoint("sdxl"), out, loras=[f"{lora}:{SCALE}"])
    (record,) = manifest.provenance.loras
    assert all(record.layers[c] > 0 for c in ("unet", "text_encoder", "text_encoder_2"))
    ref = diffusers_pipeline("StableDiffusionXLPipeline", checkpoint("sdxl"))
    _assert_renders_like_diffusers(out, ref, lora, guidance=5.0)


@pytest.mark.parametrize("fmt", ["diffusers", "diffusers-old", "kohya"])
def test_fused_lora_renders_like_diffusers_with_the_lora_loaded(checkpoint, lora_files, tmp_path, fmt):
    out = tmp_path / "bundle"
    manifest = export_bundle(checkpoint("sd1"), out, loras=[f"{lora_files[fmt]}:{SCALE}"])
    (lora,) = manifest.provenance.loras
    assert lora.format == fmt.removesuffix("-old") and lora.scale == SCALE
    assert lora.layers["unet"] > 0 and lora.layers["text_encoder"] > 0

    ref = diffusers_pipeline("StableDiffusionPipeline", checkpoint("sd1"))
    _assert_renders_like_diffusers(out, ref, lora_files["diffusers"], guidance=7.5)


def _assert_renders_like_diffusers(bundle, ref, lora_file, guidance):
    """The bundle renders what diffusers renders with the LoRA loaded and fused, and the LoRA changes the image."""
    ref.load_lora_weights(lora_file)
    ref.fuse_lora(lora_scale=SCALE)
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    kw = dict(num_inference_steps=3, guidance_scale=guidance, height=H, width=W, output_type="np")
    expected = ref("a red cat", latents=latents, **kw).images
    ref.unfuse_lora()
    ref.unload_lora_weights()
    assert np.abs(expected - ref("a red cat", latents=latents, **kw).images).max() > 1e-2  # the LoRA took effect
    got = Pipeline.load(bundle)("a red cat", latents=latents.numpy(), sampler="euler", **kw).images
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


def _assert_one_line_error(args, message, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["export", *map(str, args[:1]), str(out), *map(str, args[1:])])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_lora_whose_keys_match_no_layer(checkpoint, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.no_such_block.attn.to_q.lora_A.weight": torch.zeros(RANK, 32),
               "unet.no_such_block.attn.to_q.lora_B.weight": torch.zeros(32, RANK)}, bad)
    _assert_one_line_error([checkpoint("sd1"), "--lora", bad], "matches a layer of this unet", tmp_path)


def test_lora_for_another_architecture(checkpoint, lora_files, tmp_path):
    state = load_file(lora_files["kohya"])
    wide = {k: (torch.zeros(RANK, 2048) if k.endswith("attn2_to_k.lora_down.weight") else v) for k, v in state.items()}
    bad = tmp_path / "wide.safetensors"
    save_file(wide, bad)  # an SDXL-sized cross-attention input on an SD1 U-Net
    _assert_one_line_error([checkpoint("sd1"), "--lora", bad], "LoRA for another architecture", tmp_path)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({**state, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(RANK, 32),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(32, RANK)}, sdxl)
    _assert_one_line_error([checkpoint("sd1"), "--lora", sdxl], "text_encoder_2, which this pipeline lacks", tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickles_need_allow_pickle(checkpoint, tmp_path, suffix):
    pickle = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, pickle)
    _assert_one_line_error([pickle], "--allow-pickle", tmp_path)
    _assert_one_line_error([checkpoint("sd1"), "--lora", pickle], "--allow-pickle", tmp_path)


def test_source_folder_that_is_not_a_pipeline(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _assert_one_line_error([src], "not a diffusers pipeline folder", tmp_path)
