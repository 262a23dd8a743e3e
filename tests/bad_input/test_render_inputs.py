"""Render inputs held to the one-line promise: non-finite numbers, sizes and counts past what fits, bomb images,
undecodable prompts and click's own usage errors each give one `error:` line and exit 2 (a RenderError from the
API) before any heavy work; a model that outputs NaN is named instead of writing a black image; prompts with
control characters reach the terminal and the PNG escaped."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff import Pipeline
from edgediff.cli import main
from edgediff.runtime import backends, memory
from edgediff.runtime.backends.ort import OrtCpuSession
from edgediff.runtime.images import ImageInputError
from edgediff.runtime.plan import RenderError, make_plan
from edgediff.runtime.sessions import SessionBase

from .conftest import refused

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()


def render(tmp_path, *args):
    return ["render", PROMPT, "-o", tmp_path / "out.png", *args]


# --- the command line -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "-inf"], "guidance must be a finite number"),
    (["--strength", "nan"], "strength must be a finite number"),
    (["--strength", "inf"], "strength must be a finite number"),
    (["--strength", "5"], "strength must be in (0, 1]"),
    (["--sampler", "ddim", "--eta", "inf"], "eta must be"),
    (["--sampler", "tcd", "--eta", "nan"], "eta must be"),
    (["--size", "0x0"], "width must be at least 1"),
    (["--size", "32x0"], "height must be at least 1"),
    (["--size", "-32x32"], "width must be at least 1"),
    (["--size", "100000x100000"], "needs about"),
    (["--num-images", "1000000"], "--num-images must be 1 to 64"),
    (["--num-images", "0"], "--num-images must be 1 to 64, got 0"),
    (["--num-images", "-1"], "--num-images must be 1 to 64, got -1"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--steps", "1.5"], "is not a valid integer"),
    (["--threads", "-3"], "threads must be at least 1"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--seed", "-1"], "seed must be at least 0"),
    (["--negative", "bad \udcff bytes"], "negative prompt is not valid UTF-8"),
])
def test_bad_render_values(tmp_path, args, message):
    refused(render(tmp_path, *args), message, watch=[tmp_path])


def test_a_prompt_that_is_not_utf8_is_refused(tmp_path):
    # what click hands over for undecodable bytes on a POSIX command line: surrogate escapes
    refused(["render", "a cat \udcff\udcfe", "-o", tmp_path / "out.png"], "prompt is not valid UTF-8",
            watch=[tmp_path])


@pytest.mark.parametrize("factor", [1.5, 3], ids=["warning", "error"])
def test_a_decompression_bomb_init_image_is_refused(tmp_path, monkeypatch, factor):
    image = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(image)
    # PIL warns past MAX_IMAGE_PIXELS and raises past twice that; both are refused
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(64 * 64 / factor))
    refused(render(tmp_path, "--image", image), "too many to decode safely", watch=[tmp_path])


@pytest.mark.parametrize(("args", "message"), [
    (["render"], "Missing argument 'PROMPT'"),
    (["render", PROMPT, "--bogus"], "No such option '--bogus' (see main render --help)"),
    (["render", PROMPT, "extra"], "unexpected extra argument"),
    (["render", PROMPT, "--steps", "x"], "'x' is not a valid integer"),
    (["render", PROMPT, "--schedule"], "requires an argument"),
    (["render", PROMPT, "--sampler", "nope"], "unknown sampler 'nope'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option '--bogus'"),
    (["info", "--bogus"], "No such option '--bogus' (see main info --help)"),
    (["export", "src"], "Missing argument 'OUT'"),
    (["bench", "b", "--runs", "0"], "Invalid value for '--runs'"),
    (["samplers", "extra"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    refused(args, message, watch=[tmp_path])


# --- the API --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "latents contain NaN or infinity"),
    ({"latents": np.full((1, 4, 8, 8), np.inf, np.float32)}, "latents contain NaN or infinity"),
    ({"num_images_per_prompt": 0}, "images per prompt must be at least 1"),
    ({"num_images_per_prompt": -1}, "images per prompt must be at least 1"),
    ({"num_inference_steps": 2.5}, "steps must be at least 1 (a whole number)"),
    ({"guidance_scale": float("nan")}, "guidance must be a finite number"),
    ({"height": 0}, "height must be at least 1"),
    ({"strength": float("nan")}, "strength must be a finite number"),
    ({"height": 4096, "width": 4096, "num_images_per_prompt": 64}, "needs about"),
])
def test_bad_render_arguments(pipe, kwargs, message):
    with pytest.raises(RenderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe(PROMPT, **kwargs)


@pytest.mark.parametrize("prompt", [[], "", ["fine", 3], "caf\udce9"], ids=["empty-list", "empty", "not-str", "utf8"])
def test_bad_prompts(pipe, prompt):
    if prompt == "":
        pipe(prompt, num_inference_steps=1)  # an empty prompt is a valid unconditional render
        return
    with pytest.raises(RenderError, match="prompt"):
        pipe(prompt)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused_at_load(threads):
    with pytest.raises(RenderError, match="threads must be at least 1"):
        Pipeline.load(threads=threads)


def test_memory_low_does_not_suggest_itself(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 30)
    with pytest.raises(RenderError, match=r"needs about .* and 1\.0 GiB is available") as caught:
        Pipeline.load(memory="low")(PROMPT, height=2048, width=2048)
    assert "--memory low" not in str(caught.value)


# --- a model that outputs NaN is named --------------------------------------------------------------------------

class _Poisoned(SessionBase):
    """The CPU session, except that the component named in `poisoned` outputs NaN (as an overflowing fp16 graph)."""

    poisoned = "unet"

    def __init__(self, root, name, component, settings):
        super().__init__(name, component.inputs, component.outputs)
        self._inner = OrtCpuSession(root, name, component, settings)

    def run(self, feeds):
        out = self._inner.run(feeds)
        if self.name == _Poisoned.poisoned:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


@pytest.mark.parametrize("component", ["unet", "vae_decoder", "text_encoder"])
def test_a_model_that_outputs_nan_is_named(monkeypatch, component):
    backends.register_backend("poisoned", _Poisoned, "CPU with one component outputting NaN (tests)")
    monkeypatch.setattr(_Poisoned, "poisoned", component)
    try:
        with pytest.raises(RenderError, match=f"the {component} produced NaN or infinity .*fp32"):
            Pipeline.load(backend="poisoned")(PROMPT, num_inference_steps=1)
    finally:
        del backends.BACKENDS["poisoned"]


# --- what is echoed and written ------------------------------------------------------------------------------

def test_control_characters_are_escaped_in_warnings_and_the_png(tmp_path):
    out = tmp_path / "out.png"
    prompt = "a red\ncircle\x1b[31m\nSteps: 99 " + " ".join(["word"] * 300)
    result = CliRunner().invoke(main, ["render", prompt, "-o", str(out), "--steps", "1"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and all("\x1b" not in w for w in warnings)
    truncated = next(w for w in warnings if "truncated" in w)
    assert "dropped" in truncated and "more" in truncated and len(truncated) < 200, truncated
    parameters = Image.open(out).info["parameters"]
    first, *rest = parameters.split("\n")
    assert first.startswith("a red\\ncircle\\x1b[31m\\nSteps: 99 word") and len(rest) == 1
    assert rest[0].startswith("Steps: 1,")


def test_ordinary_prompts_are_written_unchanged(tmp_path):
    out = tmp_path / "out.png"
    prompt = "café, 猫, a 'quoted' red circle"
    result = CliRunner().invoke(main, ["render", prompt, "-o", str(out), "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).info["parameters"].split("\n")[0] == prompt


# --- the memory estimate ---------------------------------------------------------------------------------------

def _sd15_like(manifest):
    """The built-in manifest with SD 1.5's latent scale and fp32 file sizes."""
    sizes = {"text_encoder": 492_000_000, "unet": 3_440_000_000, "vae_decoder": 198_000_000}
    components = {name: replace(c, files=(replace(c.files[0], size=sizes[name]),))
                  for name, c in manifest.components.items() if name in sizes}
    return replace(manifest, latent=replace(manifest.latent, downscale=8), components=components,
                   guidance_embedding_dim=None)


@pytest.mark.parametrize(("side", "memory_mode", "most_gib"), [(512, "normal", 8), (512, "low", 8),
                                                               (1024, "normal", 22)])
def test_full_size_renders_fit_a_24_gb_machine(pipe, side, memory_mode, most_gib):
    manifest = _sd15_like(pipe.manifest)
    plan = make_plan(manifest, width=side, height=side, guidance_scale=7.5)
    need = memory.bytes_needed(manifest, plan, images=1, cfg=True, img2img=False, memory=memory_mode)
    assert need < most_gib * memory.GIB
    memory.check_fits(need, 24 * 10**9, "test", memory_mode)


def test_the_estimate_counts_only_what_is_not_loaded_yet(pipe):
    manifest = _sd15_like(pipe.manifest)
    plan = make_plan(manifest, width=512, height=512)
    kwargs = {"images": 1, "cfg": False, "img2img": False, "memory": "normal"}
    cold = memory.bytes_needed(manifest, plan, **kwargs)
    warm = memory.bytes_needed(manifest, plan, loaded=frozenset(manifest.components), **kwargs)
    assert cold - warm == 492_000_000 + 3_440_000_000 + 198_000_000


def test_available_memory_reads_the_cgroup_limit(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert memory._cgroup_headroom(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{8 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{3 << 30}\n")
    assert memory._cgroup_headroom(tmp_path) == 5 << 30
    assert memory._cgroup_headroom(tmp_path / "absent") is None
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    2000000 kB\n")
    assert memory._meminfo_available(meminfo) == 2000000 * 1024


def test_an_init_image_bomb_is_refused_by_the_api(pipe, tmp_path, monkeypatch):
    image = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageInputError, match="too many to decode safely"):
        pipe(PROMPT, image=image)
