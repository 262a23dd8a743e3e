"""A bounded load test of `edgediff serve` on 127.0.0.1: a fixed number of requests from 16 concurrent clients
against the built-in model, with batching (--max-batch 8) and without (--max-batch 1), each in a fresh server
process. Reports throughput, p50 / p99 latency and errors (429s counted apart: they are the designed answer to a
full queue).

    python benchmarks/serve_load.py [--requests 320] [--clients 16] [--max-batch 1,8] [--json out.json]

Only loopback traffic; every client stops after its share of the requests.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(base: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the server did not come up")


def client(base: str, count: int, seed0: int, latencies: list[float], errors: dict[str, int]) -> None:
    for i in range(count):
        body = json.dumps({"prompt": "a red circle left of a blue square", "seed": seed0 + i}).encode()
        request = urllib.request.Request(f"{base}/v1/images/generations", data=body,
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                r.read()
            latencies.append(time.perf_counter() - start)
        except urllib.error.HTTPError as e:
            key = str(e.code)
            errors[key] = errors.get(key, 0) + 1
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1


def run(max_batch: int, requests: int, clients: int) -> dict[str, object]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgediff.cli", "serve", "--port", str(port), "--max-batch",
                             str(max_batch), "--max-queue", str(4 * clients)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base, proc)
        client(base, 8, 10_000, [], {})  # warm-up, not counted
        latencies: list[float] = []
        errors: dict[str, int] = {}
        per = requests // clients
        threads = [threading.Thread(target=client, args=(base, per, i * per, latencies, errors))
                   for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)
    lat = np.array(latencies)
    return {"max_batch": max_batch, "requests": per * clients, "clients": clients, "ok": len(latencies),
            "seconds": round(seconds, 2), "images_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if len(lat) else None, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", default="1,8")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = [run(int(b), args.requests, args.clients) for b in args.max_batch.split(",")]
    for r in results:
        print(f"max-batch {r['max_batch']}: {r['ok']}/{r['requests']} ok in {r['seconds']} s, "
              f"{r['images_per_s']} images/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
