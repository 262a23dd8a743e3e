"""Ray on a local cluster started once for this module (a head without CPUs and two one-CPU worker nodes on this
machine): `edgediff batch --ray` equals the in-process run image for image, a worker node killed mid-run loses no
prompt (a re-run completes the set, no PNG half-written), and `serve --ray` answers the openai client."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from edgediff.serve.batch import BatchOptions, run_batch  # noqa: E402

COLOURS = ["red", "yellow", "green", "cyan", "blue", "purple"]
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"a {COLOURS[i % 6]} {SHAPES[i % 3]} above a "
                                                  f"{COLOURS[(i + 2) % 6]} circle", "seed": i}) + "\n"
                            for i in range(50)))
    return path


@pytest.fixture(scope="module")
def in_process(prompts):
    out = prompts.parent / "in_process"
    run_batch(prompts, out, BatchOptions(batch_size=4))
    return {p.name: p.read_bytes() for p in out.glob("*.png")}


def test_serve_ray_answers_the_openai_client(cluster, tmp_path):
    """`edgediff serve --ray` joins the cluster, deploys, answers; SIGTERM takes the deployment down."""
    openai = pytest.importorskip("openai")
    from serve_helpers import free_port, pixels

    from edgediff import Pipeline

    c, _ = cluster
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edgediff.cli", "serve", "--ray", "--ray-address", c.address,
                             "--port", str(port), "--replicas", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while url not in (tmp_path / "serve.log").read_text():  # the CLI says the URL once every replica is up
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        r = client.images.generate(prompt="a blue square", n=2, extra_body={"seed": 3})
        assert [m.id for m in client.models.list().data] == ["edgediff-builtin"]
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt="a blue square", size="33x33")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    expected = Pipeline.load(None)("a blue square", num_images_per_prompt=2, seed=3).images
    for d, e in zip(r.data, expected, strict=True):
        assert np.abs(pixels(d.b64_json) - np.asarray(e, np.int16)).max() <= 1


def test_ray_batch_equals_in_process(cluster, prompts, in_process):
    out = prompts.parent / "ray"
    summary = run_batch(prompts, out, BatchOptions(ray_address="auto", replicas=2, batch_size=4))
    assert summary.rendered == 50 and len(in_process) == 50
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == in_process
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{i:05d}" for i in range(1, 51)]


def test_killed_worker_loses_no_prompt(cluster, prompts, in_process):
    c, nodes = cluster
    out = prompts.parent / "killed"
    killed = []

    def progress(done, total):
        if done >= 8 and not killed:
            c.remove_node(nodes[1])  # one of the two worker nodes dies mid-run
            killed.append(done)

    try:
        run_batch(prompts, out, BatchOptions(ray_address="auto", replicas=1, batch_size=2), progress=progress)
    except Exception:
        pass  # the run may fail with the node; what it wrote must be whole and the re-run must finish the set
    assert killed
    summary = run_batch(prompts, out, BatchOptions(ray_address="auto", replicas=1, batch_size=4))
    assert summary.rendered + summary.skipped == 50
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == in_process
    assert not list(out.glob(".*partial*"))
