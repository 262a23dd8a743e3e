"""Run-time LoRA: a bundle exported once renders with LoRAs added at load (no re-export, no torch), as diffusers
renders with them loaded and fused and as the export's own fusion does; switching is exact and leaves the bundle's
files as they were; what a bundle cannot take is refused in one line with nothing half-applied."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from click.testing import CliRunner  # noqa: E402
from conftest import PIXEL_TOLERANCE, H, W, diffusers_pipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_lora import RANK, _write_lora, to_kohya  # noqa: E402
from test_precision import CALIBRATION, FP16_MAX_PIXEL_ERROR, INT8_MIN_PSNR_DB  # noqa: E402

from edgediff import Pipeline  # noqa: E402
from edgediff.cli import main  # noqa: E402
from edgediff.export.convert import export_bundle  # noqa: E402
from edgediff.export.gate import psnr_db  # noqa: E402
from edgediff.lora_format import LoraError  # noqa: E402
from edgediff.runtime.lora import LoraState, lora_maps  # noqa: E402
from edgediff.runtime.sessions import BackendError  # noqa: E402

FAMILIES = {"sd1": ("StableDiffusionPipeline", ("text_encoder",), 7.5),
            "sdxl": ("StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), 5.0)}
SCALES = (0.7, 0.4)
# LoRA b touches what a does not: the split GEGLU projection, the feed-forward output, 1x1 and 3x3 convolutions
B_TARGETS = ("proj_in", "ff.net.0.proj", "ff.net.2", "conv2", "conv_shortcut")


@pytest.fixture(scope="module")
def loras(checkpoint, tmp_path_factory):
    """Per family: LoRA a (diffusers keys), b in diffusers keys (diffusers' reference loads it) and the same b in
    kohya keys with alpha = rank / 2 (edgediff runs it)."""
    made = {}

    def get(family):
        if family not in made:
            cls, encoders, _ = FAMILIES[family]
            cls = getattr(diffusers, cls)
            folder = tmp_path_factory.mktemp(f"loras_{family}")
            (folder / "a").mkdir()
            (folder / "b").mkdir()
            a = _write_lora(cls, checkpoint(family), folder / "a", list(encoders), seed=1)
            twin = _write_lora(cls, checkpoint(family), folder / "b", list(encoders), targets=B_TARGETS, seed=2,
                               encoder_projections=("k_proj", "out_proj"))
            b = to_kohya(twin, folder / "b.safetensors", alpha=RANK / 2, single_encoder=family == "sd1")
            made[family] = a, twin, b
        return made[family]

    return get


def _render(pipe, guidance=7.5, prompt="a red cat"):
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2)).numpy()
    return pipe(prompt, latents=latents, sampler="euler", num_inference_steps=3, guidance_scale=guidance,
                height=H, width=W, output_type="np").images


def _hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_runtime_loras_render_like_diffusers_and_like_export_fusion(family, checkpoint, bundle, loras, tmp_path):
    a, twin, b = loras(family)
    cls, encoders, guidance = FAMILIES[family]
    pipe = Pipeline.load(bundle(family), loras=[(a, SCALES[0]), f"{b}:{SCALES[1]}"])
    assert set(pipe.lora_switch.layers) == {*encoders, "unet"}
    assert pipe.lora_switch.rebuilt == (*encoders, "unet")
    got = _render(pipe, guidance)
    assert np.abs(got - _render(Pipeline.load(bundle(family)), guidance)).max() > 1e-2  # the LoRAs took effect

    ref = diffusers_pipeline(cls, checkpoint(family))
    ref.load_lora_weights(a, adapter_name="a")
    ref.load_lora_weights(twin, adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=list(SCALES))
    ref.fuse_lora(adapter_names=["a", "b"])
    latents = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(2))
    expected = ref("a red cat", latents=latents, num_inference_steps=3, guidance_scale=guidance, height=H, width=W,
                   output_type="np").images
    np.testing.assert_allclose(got, expected, atol=PIXEL_TOLERANCE, rtol=0)

    export_bundle(checkpoint(family), tmp_path / "fused", loras=[f"{a}:{SCALES[0]}", (b, SCALES[1])])
    np.testing.assert_allclose(got, _render(Pipeline.load(tmp_path / "fused"), guidance), atol=1e-4, rtol=0)


def test_switching_is_exact_rebuilds_only_what_changes_and_leaves_the_bundle_untouched(bundle, loras, tmp_path):
    root = bundle("sd1")
    before = _hashes(root)
    a, _, b = loras("sd1")
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(a).items() if k.startswith("unet.")}, unet_only)
    base = _render(Pipeline.load(root))

    pipe = Pipeline.load(root, loras=[(a, 0.7)])
    first = _render(pipe)
    switch = pipe.set_loras([(b, 0.4)])
    assert switch.rebuilt == ("text_encoder", "unet") and switch.seconds >= switch.weights_seconds > 0
    assert np.abs(_render(pipe) - first).max() > 1e-2
    pipe.set_loras([(a, 0.7)])
    assert np.array_equal(_render(pipe), first)

    encoder = pipe.session("text_encoder")
    switch = pipe.set_loras([(a, 0.7), (unet_only, 0.5)])
    assert switch.rebuilt == ("unet",) and pipe.session("text_encoder") is encoder
    assert np.abs(_render(pipe) - first).max() > 1e-3
    assert pipe.set_loras([]).rebuilt == ("text_encoder", "unet")
    assert np.array_equal(_render(pipe), base)
    assert _hashes(root) == before  # nothing written, nothing changed, nothing added


def test_a_lora_session_bypasses_the_optimised_graph_cache(bundle, bundle_copy, loras):
    """The graph cache holds a graph optimised from the bundle's own weights (convolutions re-laid out): a LoRA
    session that loaded it would run without the LoRA's convolution deltas, or fail."""
    a, _, b = loras("sd1")
    copy = bundle_copy("sd1")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["unet"]["ort_options"]["cache_optimized_graph"] = True
    (copy / "manifest.json").write_text(json.dumps(manifest))
    base = _render(Pipeline.load(copy))
    assert list((copy / "unet" / ".ort-optimized").iterdir())  # the cache is there to be ignored
    got = _render(Pipeline.load(copy, loras=[(a, 0.7), (b, 0.4)]))
    assert np.abs(got - base).max() > 1e-2
    np.testing.assert_allclose(got, _render(Pipeline.load(bundle("sd1"), loras=[(a, 0.7), (b, 0.4)])), atol=1e-6)


def test_what_a_bundle_cannot_take_is_refused_and_nothing_is_half_applied(bundle, bundle_copy, loras, tmp_path):
    root = bundle("sd1")
    a, _, b = loras("sd1")
    no_match = tmp_path / "no_match.safetensors"
    save_file({"unet.no_such_block.attn.to_q.lora_A.weight": torch.zeros(RANK, 32),
               "unet.no_such_block.attn.to_q.lora_B.weight": torch.zeros(32, RANK)}, no_match)
    wide = tmp_path / "wide.safetensors"
    save_file({k: (torch.zeros(RANK, 2048) if k.endswith("attn2.to_k.lora_A.weight") else v)
               for k, v in load_file(a).items()}, wide)  # an SDXL-sized cross-attention input
    pipe = Pipeline.load(root, loras=[(a, 0.7)])
    first, switch = _render(pipe), pipe.lora_switch
    for bad, message in ((loras("sdxl")[2], "text_encoder_2, which this pipeline lacks"),
                         (no_match, "none of its 1 unet layers matches a layer of this bundle's unet"),
                         (wide, "LoRA for another architecture"),
                         (tmp_path / "missing.safetensors", "no such LoRA file")):
        with pytest.raises(LoraError, match=message):
            pipe.set_loras([(a, 0.7), bad])
    assert pipe.lora_switch is switch and np.array_equal(_render(pipe), first)

    old = bundle_copy("sd1")  # as an edgediff before run-time LoRA wrote it
    manifest = json.loads((old / "manifest.json").read_text())
    for component in manifest["components"].values():
        component.pop("lora_map", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    for path in (old, None):  # None: the built-in model, whose bundle predates the maps
        with pytest.raises(LoraError, match=r"without LoRA maps .* re-export it with this edgediff"):
            Pipeline.load(path, loras=[a])
    with pytest.raises(BackendError, match="cannot take run-time LoRAs"):
        Pipeline.load(root, backend="tensorrt", loras=[a])


def test_render_and_info_take_lora(bundle, loras, tmp_path):
    root = bundle("sd1")
    a, _, b = loras("sd1")
    out = tmp_path / "out.png"
    r = CliRunner().invoke(main, ["render", "a red cat", "-m", str(root), "-o", str(out), "--lora", f"{a}:0.7",
                                  "--lora", str(b)])
    assert r.exit_code == 0, r.output
    assert "LoRA: text_encoder 8 layers, unet 65 layers; rebuilt text_encoder, unet in" in r.stderr and out.is_file()
    r = CliRunner().invoke(main, ["render", "x", "-m", str(root), "-o", str(tmp_path / "no.png"), "--lora", str(out)])
    assert r.exit_code == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.output
    assert not (tmp_path / "no.png").exists()
    r = CliRunner().invoke(main, ["info", str(root), "--lora", str(a)])
    assert r.exit_code == 0, r.output
    unet_layers = len({k.rsplit(".lora_", 1)[0] for k in load_file(a) if k.startswith("unet.")})
    assert f"text_encoder 4 layers, unet {unet_layers} layers" in r.stdout


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_bundles_take_loras_in_their_own_format(precision, checkpoint, bundle, loras, tmp_path):
    a, _, b = loras("sd1")
    out = tmp_path / precision
    export_bundle(checkpoint("sd1"), out, precision=precision, calibration=CALIBRATION)
    specs = [(a, 0.7), (b, 0.4)]
    fp32 = _render(Pipeline.load(bundle("sd1"), loras=specs))
    got = _render(Pipeline.load(out, loras=specs))
    if precision == "fp16":
        assert np.abs(got - fp32).max() <= FP16_MAX_PIXEL_ERROR
    else:
        assert psnr_db(fp32, got) >= INT8_MIN_PSNR_DB
        assert np.abs(got - _render(Pipeline.load(out))).max() > 1e-2
    manifest = Pipeline.load(out, memory="low").manifest
    state = LoraState(out, manifest)
    state.apply(state.prepare([(a, 0.0), (b, 0.0)]))
    weights = state.weights["unet"]  # no change: the bundle's own weights back
    refs = {ref.name: ref for layer in lora_maps(out, manifest, ["unet"])["unet"].layers.values()
            for part in layer.parts for ref in (part.weight, part.scale) if ref is not None}
    dtypes = {str(w.dtype) for w in weights.values()}
    assert dtypes == ({"float16"} if precision == "fp16" else {"int8", "float32"})
    for name, w in weights.items():
        stored = np.fromfile(out / refs[name].file, refs[name].dtype, w.size, offset=refs[name].offset)
        assert np.array_equal(stored.reshape(w.shape), w), name  # int8: re-quantized exactly as the export did


NO_TORCH = r"""
import sys
for name in ("torch", "diffusers", "transformers", "safetensors", "peft"):
    sys.modules[name] = None  # makes `import name` raise ImportError
from edgediff import Pipeline
pipe = Pipeline.load(sys.argv[1], loras=[(sys.argv[2], 0.7), sys.argv[3] + ":0.4"])
pipe("a red cat", num_inference_steps=2, height=32, width=32)
print(pipe.lora_switch.describe())
"""


def test_runtime_loras_need_no_torch_nor_safetensors(bundle, loras):
    import subprocess
    import sys

    a, _, b = loras("sd1")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle("sd1")), str(a), str(b)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LoRA: text_encoder 8 layers, unet 65 layers" in done.stdout


def test_serve_and_batch_take_lora(bundle, loras, tmp_path):
    """`serve --lora` and `batch --lora` add the LoRA as `render --lora` does: the same image."""
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    from PIL import Image
    from serve_helpers import client, pixels, running_server

    from edgediff.serve.app import Settings, load_models

    root = bundle("sd1")
    a, _, _ = loras("sd1")
    r = CliRunner().invoke(main, ["render", "a red cat", "-m", str(root), "-o", str(tmp_path / "r.png"), "--seed", "4",
                                  "--steps", "2", "--size", "32x32", "--lora", f"{a}:0.7"])
    assert r.exit_code == 0, r.output
    expected = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"), np.int16)
    served = load_models(Settings(bundles=[str(root)], loras=[(str(a), 0.7)]))
    with running_server(served) as base:
        got = client(base).images.generate(prompt="a red cat", model=root.name, size="32x32",
                                           extra_body={"seed": 4, "steps": 2})
    assert np.abs(pixels(got.data[0].b64_json) - expected).max() <= 1
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "cat", "prompt": "a red cat", "seed": 4, "steps": 2, "size": "32x32"}) + "\n")
    r = CliRunner().invoke(main, ["batch", str(prompts), str(tmp_path / "out"), "-m", str(root), "--lora", f"{a}:0.7"])
    assert r.exit_code == 0, r.output
    (png,) = (tmp_path / "out").glob("*.png")
    assert np.abs(np.asarray(Image.open(png).convert("RGB"), np.int16) - expected).max() <= 1
