"""`edgediff serve` under load and at its edges: 429 with Retry-After, per-request timeout, cancellation when the
client goes away, 401 without the key, and SIGTERM's graceful shutdown of a real `edgediff serve` process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from serve_helpers import SLOW, client, free_port, get, metric, running_server  # noqa: E402

PROMPT = "a green triangle"


def _wait_for(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _slow_request(c):
    try:
        c.images.generate(prompt=PROMPT, extra_body=SLOW)
    except openai.APIStatusError:  # 504: the server's timeout ends it
        pass


def test_full_queue_gets_429_with_retry_after(serve_models):
    with running_server(serve_models, max_queue=1, workers=1, limits=_limits(timeout=3)) as base:
        c = client(base)
        threads = [threading.Thread(target=_slow_request, args=(c,)) for _ in range(2)]
        threads[0].start()
        _wait_for(lambda: metric(base, "edgediff_images_rendering") == 1)  # the worker holds the first
        threads[1].start()
        _wait_for(lambda: metric(base, "edgediff_queue_depth") == 1)  # the second fills the queue
        with pytest.raises(openai.RateLimitError) as e:
            c.images.generate(prompt=PROMPT)
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "queue_full"
        assert metric(base, "edgediff_requests_rejected_total", reason="queue_full") == 1
        for t in threads:
            t.join(30)


def test_timeout_stops_the_render(serve_models):
    with running_server(serve_models, limits=_limits(timeout=0.5)) as base:
        c = client(base)
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            c.images.generate(prompt=PROMPT, extra_body=SLOW)
        assert e.value.status_code == 504 and time.monotonic() - start < 2.5
        _wait_for(lambda: metric(base, "edgediff_images_rendering") == 0, 1.5)  # stopped at its next step
        assert metric(base, "edgediff_requests_rejected_total", reason="timeout") == 1
        assert c.images.generate(prompt=PROMPT).data  # the worker is free again


def test_client_going_away_cancels_the_render(serve_models):
    with running_server(serve_models) as base:
        start = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            client(base, timeout=0.4).images.generate(prompt=PROMPT, extra_body=SLOW)
        _wait_for(lambda: metric(base, "edgediff_requests_rejected_total", reason="cancelled") == 1, 3)
        _wait_for(lambda: metric(base, "edgediff_images_rendering") == 0, 1.0)
        assert time.monotonic() - start < 4  # a SLOW render runs 5 s or more: it was stopped, not finished
        assert metric(base, "edgediff_images_served_total", model="edgediff-builtin") == 0


def test_api_key(serve_models, monkeypatch):
    with running_server(serve_models, api_key="s3cret") as base:
        with pytest.raises(openai.AuthenticationError) as e:
            client(base, key="wrong").images.generate(prompt=PROMPT)
        assert e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, key="wrong").models.list()
        assert client(base, key="s3cret").images.generate(prompt=PROMPT).data
        assert get(f"{base}/healthz")[0] == 200  # probes need no key


def test_api_key_from_the_environment(monkeypatch):
    from click.testing import CliRunner

    from edgediff.cli import main

    monkeypatch.setenv("EDGEDIFF_API_KEY", "k")
    seen = {}
    monkeypatch.setattr("uvicorn.Server.run", lambda self: seen.setdefault("app", self.config.app))
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port())])
    assert result.exit_code == 0, result.output
    monkeypatch.undo()
    with running_server(app=seen["app"]) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base).models.list()
        assert client(base, key="k").models.list().data


def _limits(**kw):
    from edgediff.serve.requests import Limits

    return Limits(**kw)


def test_sigterm_finishes_running_work_then_exits(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edgediff.cli", "serve", "--port", str(port),
                             "--shutdown-timeout", "20"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: _up(base), 60)
        answer: dict[str, object] = {}

        def slow():
            body = json.dumps({"prompt": PROMPT, "sampler": "euler", "steps": 200}).encode()
            request = urllib.request.Request(f"{base}/v1/images/generations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                answer["status"], answer["body"] = r.status, json.loads(r.read())

        thread = threading.Thread(target=slow)
        thread.start()
        _wait_for(lambda: metric(base, "edgediff_images_rendering") == 1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert not _up(base)  # new work is refused once SIGTERM arrived
        thread.join(30)
        assert answer.get("status") == 200 and answer["body"]["data"][0]["b64_json"]  # the running one finished
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def _up(base: str) -> bool:
    try:
        return get(f"{base}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


class _Broken:
    """A Pipeline whose render fails the way a bug would."""

    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        raise RuntimeError("secret internal detail")


def test_a_bug_answers_500_without_its_traceback(serve_models):
    from edgediff.serve.queue import Served

    real = serve_models["edgediff-builtin"]
    broken = {real.name: Served(real.name, _Broken(real.pipeline), real.preview)}
    with running_server(broken) as base:
        c = client(base)
        for stream in (False, True):  # a 500, or mid-stream an error event (openai.APIError either way)
            with pytest.raises(openai.APIError) as e:
                list(c.images.generate(prompt=PROMPT, stream=True)) if stream else c.images.generate(prompt=PROMPT)
            assert "secret" not in str(e.value.body) and "Traceback" not in str(e.value.body)
            assert e.value.body["type"] == "server_error"
        assert c.images.generate is not None and get(f"{base}/healthz")[0] == 200  # the worker survived
