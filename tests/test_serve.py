"""`edgediff serve`'s app driven by the official openai client on 127.0.0.1, with the built-in model: images equal
`edgediff render`, batched or not; edits; streaming; the 400s; /metrics; /v1/models."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import client, get, metric, pixels, running_server  # noqa: E402

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def server(serve_models):
    with running_server(serve_models, max_batch=8) as base:
        yield base


def _render_cli(tmp_path, *args) -> list[np.ndarray]:
    from click.testing import CliRunner

    from edgediff.cli import main

    out = tmp_path / "r.png"
    result = CliRunner().invoke(main, ["render", PROMPT, "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    paths = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in paths]


def test_generations_equal_edgediff_render(server, tmp_path):
    r = client(server).images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"seed": 11, "steps": 3})
    assert r.size == "32x32" and r.output_format == "png" and len(r.data) == 2
    expected = _render_cli(tmp_path, "--seed", "11", "--steps", "3", "--num-images", "2", "--size", "32x32")
    got = [pixels(d.b64_json) for d in r.data]
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g - e).max() <= 1
    assert np.abs(got[0] - got[1]).max() > 10  # two images of one seed differ: one stream, not the seed twice


def test_batched_requests_keep_their_own_noise(serve_models):
    """Requests queued behind a slow one are rendered as one batch; each equals its own render (LCM draws fresh
    noise every step, so this needs one noise stream per request, not just per-request initial latents)."""
    pipe = serve_models["edgediff-builtin"].pipeline
    seeds = [1, 2, 3, 4]
    with running_server(serve_models, max_batch=8) as base:
        c = client(base)
        busy = {"sampler": "euler", "steps": 150}  # holds the worker ~1 s while the others queue
        slow = threading.Thread(target=lambda: c.images.generate(prompt=PROMPT, extra_body=busy))
        slow.start()
        import time

        time.sleep(0.3)  # the slow render holds the one worker; the next four queue up together
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, c.images.generate(
            prompt=PROMPT, extra_body={"seed": s, "negative_prompt": f"green {s}"}).data[0].b64_json))
            for s in seeds]
        for t in threads:
            t.start()
        for t in threads + [slow]:
            t.join(60)
        batches = metric(base, "edgediff_batch_images_count")
        big = metric(base, "edgediff_batch_images_sum")
    assert batches < 5 and big == 5  # 5 images in fewer than 5 calls: the four batched (with 1 or 2 calls)
    for s in seeds:
        alone = pipe(PROMPT, seed=s, negative_prompt=f"green {s}", output_type="pil").images[0]
        assert np.abs(pixels(results[s]) - np.asarray(alone, np.int16)).max() <= 1


def test_edits_image_to_image(server, serve_models):
    init = Image.new("RGB", (32, 32), (200, 40, 40))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    c = client(server)
    r = c.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt=PROMPT,
                      extra_body={"strength": 0.6, "seed": 5})
    expected = serve_models["edgediff-builtin"].pipeline(PROMPT, image=init, strength=0.6, seed=5).images[0]
    assert np.abs(pixels(r.data[0].b64_json) - np.asarray(expected, np.int16)).max() <= 1
    events = list(c.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt=PROMPT, stream=True,
                                partial_images=1, extra_body={"strength": 0.6, "seed": 5}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert np.abs(pixels(events[-1].b64_json) - pixels(r.data[0].b64_json)).max() <= 1
    with pytest.raises(openai.BadRequestError) as e:
        c.images.edit(image=("init.png", buf.getvalue(), "image/png"), mask=("m.png", buf.getvalue(), "image/png"),
                      prompt=PROMPT)
    assert e.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as e:
        c.images.edit(image=("init.png", b"not an image", "image/png"), prompt=PROMPT)
    assert e.value.body["param"] == "image"


def test_output_formats(server):
    for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
        r = client(server).images.generate(prompt=PROMPT, output_format=fmt, output_compression=10)
        assert r.output_format == fmt
        import base64

        assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).format == pil


def test_streaming_partial_images(server):
    c = client(server)
    events = list(c.images.generate(prompt=PROMPT, stream=True, partial_images=2, extra_body={"seed": 9}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    preview = pixels(events[0].b64_json)
    assert preview.shape == (32, 32, 3) and preview.std() > 0
    whole = c.images.generate(prompt=PROMPT, extra_body={"seed": 9}).data[0].b64_json
    assert np.abs(pixels(events[-1].b64_json) - pixels(whole)).max() <= 1


@pytest.mark.parametrize("kwargs, param", [
    ({"size": "33x33"}, "size"),
    ({"size": "big"}, "size"),
    ({"n": 100}, "n"),
    ({"response_format": "url"}, "response_format"),
    ({"extra_body": {"sampler": "nope"}}, "sampler"),
    ({"extra_body": {"steps": 0}}, "steps"),
    ({"extra_body": {"stepz": 2}}, "stepz"),
    ({"extra_body": {"guidance_scale": "loud"}}, "guidance_scale"),
    ({"extra_body": {"strength": 0.5}}, "strength"),
    ({"partial_images": 7, "stream": True}, "partial_images"),
    ({"size": "100000x100000"}, "size"),
])
def test_bad_fields_get_400_naming_them(server, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.generate(prompt=PROMPT, **kwargs)
    body = e.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert "Traceback" not in body["message"]


def test_unknown_model_and_bad_json(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).images.generate(prompt=PROMPT, model="dall-e-3")
    assert e.value.body["param"] == "model" and "edgediff-builtin" in e.value.body["message"]
    import urllib.request

    request = urllib.request.Request(f"{server}/v1/images/generations", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400 and b'"error"' in e.value.read()


def test_models_health_and_metrics(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["edgediff-builtin"]
    assert models[0].model_extra["family"] == "sd1" and models[0].model_extra["defaults"]["steps"] == 4
    assert get(f"{server}/healthz")[0] == 200
    before = metric(server, "edgediff_images_served_total", model="edgediff-builtin")
    client(server).images.generate(prompt=PROMPT, n=3)
    assert metric(server, "edgediff_images_served_total", model="edgediff-builtin") == before + 3
    assert metric(server, "edgediff_stage_seconds_count", stage="steps") > 0
    assert metric(server, "edgediff_stage_seconds_count", stage="vae_decoder") > 0
    assert metric(server, "edgediff_queue_depth") == 0
    assert metric(server, "edgediff_requests_rejected_total", reason="bad_request") >= 0


NO_TORCH = r"""
import sys
for name in ("torch", "diffusers", "transformers", "optimum"):
    sys.modules[name] = None  # makes `import name` raise ImportError
import json, threading, time, urllib.request
import uvicorn
from edgediff.serve.app import Settings, build_app
server = uvicorn.Server(uvicorn.Config(build_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]),
                                       log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.02)
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/images/generations",
                                 data=json.dumps({"prompt": "a red circle"}).encode(),
                                 headers={"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
server.should_exit = True
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers") and sys.modules[m])
print(json.dumps({"images": len(answer["data"]), "heavy": heavy}))
"""


def test_server_imports_no_torch():
    import json
    import subprocess
    import sys

    from serve_helpers import free_port

    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(free_port())], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"images": 1, "heavy": []}


def test_two_bundles_by_folder_name(bundle, tmp_path):
    import shutil

    from edgediff.serve.app import Settings, load_models

    sd1 = tmp_path / "tiny-sd1"
    shutil.copytree(bundle("sd1"), sd1)
    served = load_models(Settings(bundles=[str(sd1)]))
    served.update(load_models(Settings()))
    with running_server(served) as base:
        c = client(base)
        assert [m.id for m in c.models.list().data] == ["tiny-sd1", "edgediff-builtin"]
        r = c.images.generate(prompt="a cat", model="tiny-sd1", size="32x32", extra_body={"seed": 2, "steps": 2})
    expected = served["tiny-sd1"].pipeline("a cat", height=32, width=32, seed=2, num_inference_steps=2).images[0]
    assert np.abs(pixels(r.data[0].b64_json) - np.asarray(expected, np.int16)).max() <= 1
    with pytest.raises(ValueError, match="two bundles are named"):
        load_models(Settings(bundles=[str(sd1), str(sd1)]))
