"""`edgediff batch`: a prompt file rendered to one PNG per line, in this process or over a Ray cluster.

The prompt file holds JSON lines: {"prompt": "...", "id": "cat-1", "seed": 0, "steps": 4, "guidance": 4.0,
"size": "32x32", "negative_prompt": "...", "sampler": "lcm", "schedule": "lcm", "model": "path/to/bundle"}; only
`prompt` is needed. `id` names the PNG (default: the line number, 00001); `seed` defaults to 0 as `edgediff render`
does, so a line renders what `edgediff render` renders with the same values; `model` is a bundle folder (default:
--model, else the built-in model).

With Ray, Ray Data maps the lines over an actor pool (`map_batches`), each actor holding its Pipelines; the actors
send PNG bytes back and this process writes them, so the workers need no shared filesystem. Each PNG is written
atomically, and its line is appended to results.jsonl only once the PNG is in place: a run killed at any point
leaves whole PNGs and whole records, and the next run skips every line whose record and PNG are there (a line
whose values changed since is rendered again). Compatible lines in one actor call render as one Pipeline batch,
each with its own noise stream (the Pipeline's list of seeds), so batching changes no image.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_file
from ..bundle import BundleError
from ..cli_options import png_parameters
from ..runtime.images import write_png
from ..runtime.pipeline import Pipeline, RenderError
from . import BUILTIN_ID

FIELDS: dict[str, type | tuple[type, ...]] = {
    "prompt": str, "id": str, "seed": int, "steps": int, "guidance": (int, float), "size": str,
    "negative_prompt": str, "sampler": str, "schedule": str, "model": str,
}
RESULTS = "results.jsonl"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class BatchOptions:
    bundle: str | None = None
    replicas: int = 1
    batch_size: int = 4
    threads: int | None = None
    backend: str = "cpu"
    ray_address: str | None = None  # None: in this process; "local": a Ray started here; else a cluster's address
    loras: list[tuple[str, float]] = field(default_factory=list)  # (absolute path, scale), added to every model


@dataclass
class Summary:
    rendered: int
    skipped: int
    total: int


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The prompt file's lines, each checked; one RenderError line names the first bad one."""
    lines: list[dict[str, Any]] = []
    ids: set[str] = set()
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise RenderError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(line, dict) or not isinstance(line.get("prompt"), str):
            raise RenderError(f'{where}: each line must be a JSON object with a "prompt" string')
        for key, value in line.items():
            kind = FIELDS.get(key)
            if kind is None:
                raise RenderError(f"{where}: unknown field {key!r}; the fields are {', '.join(FIELDS)}")
            if not isinstance(value, kind) or isinstance(value, bool):
                raise RenderError(f"{where}: {key} has the wrong type ({type(value).__name__})")
        line.setdefault("id", f"{number:05d}")
        if not _ID.fullmatch(line["id"]) or line["id"] in ids:
            raise RenderError(f"{where}: id {line['id']!r} must be unique, letters, digits, '.', '_' or '-'")
        ids.add(line["id"])
        lines.append(line)
    return lines


class Renderer:
    """What each actor holds (or this process, without Ray): the Pipelines, loaded on first use."""

    def __init__(self, bundle: str | None = None, threads: int | None = None, backend: str = "cpu",
                 loras: list[tuple[str, float]] | None = None) -> None:
        self.bundle, self.threads, self.backend, self.loras = bundle, threads, backend, loras or []
        self.pipelines: dict[str | None, Pipeline] = {}

    def pipeline(self, model: str | None) -> Pipeline:
        if model not in self.pipelines:
            self.pipelines[model] = Pipeline.load(model, backend=self.backend, threads=self.threads, loras=self.loras)
        return self.pipelines[model]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data's batch ({"line": JSON texts}) -> {"id", "png" (bytes), "record" (JSON text)}."""
        lines = [json.loads(str(text)) for text in batch["line"]]
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for line in lines:
            key = tuple(line.get(k) for k in ("model", "steps", "guidance", "size", "sampler", "schedule"))
            groups.setdefault((*key, "negative_prompt" in line), []).append(line)
        out: dict[str, list[Any]] = {"id": [], "png": [], "record": []}
        for group in groups.values():
            for line, png, record in self._render(group):
                out["id"].append(line["id"])
                out["png"].append(png)
                out["record"].append(json.dumps(record))
        return {k: np.array(v, dtype=object) for k, v in out.items()}

    def _render(self, group: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], bytes, dict[str, Any]]]:
        first = group[0]
        model = first.get("model", self.bundle)
        pipe = self.pipeline(model)
        width, height = _size(first.get("size"))
        start = time.perf_counter()
        out = pipe([line["prompt"] for line in group],
                   negative_prompt=[line.get("negative_prompt", "") for line in group]
                   if "negative_prompt" in first else None,
                   num_inference_steps=first.get("steps"), guidance_scale=first.get("guidance"), width=width,
                   height=height, seed=[line.get("seed", 0) for line in group], sampler=first.get("sampler"),
                   schedule=first.get("schedule"))
        seconds = (time.perf_counter() - start) / len(group)
        assert out.plan is not None
        for line, image in zip(group, out.images):
            mine = replace(out.plan, seed=line.get("seed", 0), seeds=())
            buf = io.BytesIO()
            write_png(image, buf, png_parameters(line["prompt"], line.get("negative_prompt"), mine, pipe.root))
            record = {"id": line["id"], "file": f"{line['id']}.png", "prompt": line["prompt"], "seed": mine.seed,
                      "steps": mine.steps, "guidance": mine.guidance_scale, "size": f"{mine.width}x{mine.height}",
                      "sampler": mine.sampler, "schedule": mine.schedule,
                      "model": BUILTIN_ID if model is None else pipe.root.name,
                      "seconds": round(seconds, 4), "line": line}
            yield line, buf.getvalue(), record


def check_lines(lines: list[dict[str, Any]], default: str | None) -> None:
    """Each line's plan against its bundle's manifest, before any worker starts: a bad value is one line here,
    not an error deep inside a Ray actor."""
    from ..bundle import load_manifest
    from ..models import builtin_bundle
    from ..runtime.plan import make_plan

    manifests = {}
    for line in lines:
        model = line.get("model", default)
        try:
            if model not in manifests:
                path = model if model is not None else builtin_bundle()
                if path is None:
                    raise BundleError("this install has no built-in model; give --model or each line a model")
                manifests[model] = load_manifest(path)
            width, height = _size(line.get("size"))
            make_plan(manifests[model], steps=line.get("steps"), guidance_scale=line.get("guidance"), width=width,
                      height=height, seed=line.get("seed", 0), sampler=line.get("sampler"),
                      schedule=line.get("schedule"))
        except (RenderError, BundleError) as e:
            raise RenderError(f"line {line['id']}: {e}") from None


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size.lower())
    if not match:
        raise RenderError(f"size must be WIDTHxHEIGHT, got {size!r}")
    return int(match[1]), int(match[2])


def read_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The records of earlier runs whose PNG is in place (a line cut short by a kill is ignored)."""
    records: dict[str, dict[str, Any]] = {}
    path = out_dir / RESULTS
    if path.exists():
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and (out_dir / f"{record.get('id')}.png").is_file():
                records[record["id"]] = record
    return records


def run_batch(prompts: Path, out_dir: Path, options: BatchOptions,
              progress: Callable[[int, int], None] | None = None) -> Summary:
    lines = read_prompts(prompts)
    check_lines(lines, options.bundle)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_results(out_dir)
    todo = [line for line in lines if done.get(line["id"], {}).get("line") != line]
    skipped = len(lines) - len(todo)
    report = progress or (lambda n, total: None)
    report(skipped, len(lines))
    count = skipped
    with (out_dir / RESULTS).open("a", encoding="utf-8") as results:
        for batch in _results(todo, options):
            for id_, png, record in zip(batch["id"], batch["png"], batch["record"]):
                with atomic_file(out_dir / f"{id_}.png") as tmp:
                    tmp.write_bytes(bytes(png))
                results.write(str(record) + "\n")
                results.flush()
                done[str(id_)] = json.loads(str(record))
                count += 1
                report(count, len(lines))
    order = {line["id"]: i for i, line in enumerate(lines)}
    with atomic_file(out_dir / RESULTS) as tmp:  # tidy: one record per line of the prompt file, in its order
        tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(
            (r for r in done.values() if r["id"] in order), key=lambda r: order[r["id"]])), encoding="utf-8")
    return Summary(len(todo), skipped, len(lines))


def _results(todo: list[dict[str, Any]], options: BatchOptions) -> Iterator[dict[str, Any]]:
    texts = [json.dumps(line) for line in todo]
    if not texts:
        return
    if options.ray_address is None:
        renderer = Renderer(options.bundle, options.threads, options.backend, options.loras)
        for i in range(0, len(texts), options.batch_size):
            yield renderer({"line": texts[i:i + options.batch_size]})
        return
    yield from _ray_results(texts, options)


def _ray_results(texts: list[str], options: BatchOptions) -> Iterator[dict[str, Any]]:
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=None if options.ray_address == "local" else options.ray_address,
                 include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours is the one bar
    dataset = ray.data.from_items([{"line": t} for t in texts])
    rendered = dataset.map_batches(
        Renderer, fn_constructor_kwargs={"bundle": options.bundle, "threads": options.threads,
                                         "backend": options.backend, "loras": options.loras},
        batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=options.replicas), num_cpus=1,
        batch_format="numpy")
    yield from rendered.iter_batches(batch_size=None, batch_format="numpy")
