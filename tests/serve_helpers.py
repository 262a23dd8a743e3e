"""What the serve tests share: an app on 127.0.0.1 on a free port in a thread, the official openai client on it, and
the renders it must equal."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
from PIL import Image

# 5 s to 15 s on the built-in model (2 cores, idle to busy): tests that stop it assert it stopped far sooner
SLOW = {"sampler": "euler", "steps": 1000}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(models=None, app=None, **settings):
    """An edgediff app (edgediff.serve.app.Settings(**settings)) served by uvicorn in a thread; yields its base
    URL. `models` reuses already loaded ones (the built-in Pipeline loads in ~0.1 s, but a module shares one)."""
    import uvicorn

    from edgediff.serve.app import Settings, create_app, load_models

    config = Settings(**settings)
    app = app or create_app(models if models is not None else load_models(config), config)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def client(base: str, key: str = "unused", **kwargs):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, **kwargs)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(base: str, name: str, **labels) -> float:
    """One sample of /metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(f"{base}/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
