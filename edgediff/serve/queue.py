"""The render queue: a bounded queue of jobs, worker threads that batch compatible jobs into one Pipeline call,
and the cancellation and timeout checks that stop a render at its next step.

Compatible means one resolved plan apart from the seed (same bundle, size, steps, guidance, sampler, schedule,
images per request) and the same kind of negative prompt (SDXL renders "no negative" differently from ""). Each
job keeps its own noise stream inside a batch (the Pipeline's list of seeds), so its images equal a render of it
alone. Jobs are taken as they stand when a worker comes free: no waiting for a batch to fill, so an idle server
answers at once and a busy one batches what queued up meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..runtime.pipeline import Pipeline, RenderError, RenderPlan

log = logging.getLogger("edgediff.serve")

# (job, partial image index, previews of the job's images) from a worker thread
PartialSink = Callable[["Job", int, list[Image.Image]], None]


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the render queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class JobStopped(Exception):
    """A job that ended without images: `reason` is "cancelled", "timeout" or "shutdown"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Job:
    model: str
    prompt: str
    plan: RenderPlan  # resolved and checked by the app; its seed is this job's
    negative_prompt: str | None = None
    image: Image.Image | None = None  # image-to-image: such jobs are never batched
    partial_images: int = 0
    on_partial: PartialSink | None = None
    timeout: float | None = None
    created: float = field(default_factory=time.monotonic)
    future: Future[tuple[list[Image.Image], dict[str, Any]]] = field(default_factory=Future)
    stopped: str | None = None  # why the job was given up: "cancelled", "timeout", "shutdown"

    @property
    def images(self) -> int:
        return self.plan.images_per_prompt

    def key(self) -> tuple[object, ...]:
        if self.image is not None:
            return ("img2img", id(self))
        return self.model, replace(self.plan, seed=0, seeds=()), self.negative_prompt is None

    def cancel(self, reason: str = "cancelled") -> None:
        if self.stopped is None:
            self.stopped = reason

    def expired(self, now: float) -> bool:
        if self.timeout is not None and now > self.created + self.timeout and self.stopped is None:
            self.stopped = "timeout"
        return self.stopped is not None

    def partial_steps(self) -> list[int]:
        """The steps (1-based) after which a preview goes out: evenly spaced, before the last one."""
        steps = self.plan.steps
        return sorted({max(1, min(steps - 1, round(i * steps / (self.partial_images + 1))))
                       for i in range(1, self.partial_images + 1)}) if steps > 1 else []


@dataclass
class Served:
    """One bundle being served."""

    name: str
    pipeline: Pipeline
    preview: Callable[[np.ndarray], list[Image.Image]] | None = None  # latents -> preview images


class Scheduler:
    def __init__(self, models: dict[str, Served], *, workers: int, max_batch: int, max_queue: int,
                 observe: Callable[[str, Any], None] | None = None) -> None:
        self.models = models
        self.max_batch = max(1, max_batch)
        self.max_queue = max(0, max_queue)
        self._observe = observe or (lambda event, value: None)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.running = 0
        self._seconds_per_image = 0.1  # a running mean; Retry-After is derived from it
        self._threads = [threading.Thread(target=self._work, name=f"edgediff-render-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def submit(self, job: Job) -> Future[tuple[list[Image.Image], dict[str, Any]]]:
        with self._cond:
            if self._closing:
                raise JobStopped("shutdown")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.append(job)
            self._cond.notify()
        return job.future

    def retry_after(self) -> int:
        images = sum(j.images for j in self._waiting) + self.running
        return max(1, math.ceil(images * self._seconds_per_image / len(self._threads)))

    def close(self, timeout: float) -> None:
        """Refuse new jobs, let the workers finish what is queued and running, and after `timeout` stop the rest
        at their next step (their requests get 503)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._stop_all = True
            for job in self._waiting:
                job.cancel("shutdown")
                _fail(job, JobStopped("shutdown"))
            self._waiting.clear()

    _stop_all = False  # set at the end of close(): running renders stop at their next step

    # --- the workers ------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._render(batch)
            except Exception as e:  # a bug must fail its requests, not kill the worker
                log.exception("render failed")
                for job in batch:
                    _fail(job, e)
            finally:
                with self._cond:
                    self.running -= sum(j.images for j in batch)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._waiting and self._waiting[0].expired(now):
                    job = self._waiting.popleft()
                    _fail(job, JobStopped(job.stopped or "cancelled"))
                if self._waiting:
                    break
                if self._closing:
                    return None
                self._cond.wait()
            first = self._waiting.popleft()
            batch, images, key = [first], first.images, first.key()
            for job in list(self._waiting):
                if images + job.images > self.max_batch:
                    break
                if job.key() == key and not job.expired(now) and self._fits(first, images + job.images):
                    self._waiting.remove(job)
                    batch.append(job)
                    images += job.images
            self.running += images
            return batch

    def _fits(self, job: Job, images: int) -> bool:
        """Whether a batch of `images` like `job` fits this machine's memory (runtime/memory.py's estimate)."""
        try:
            self.models[job.model].pipeline.check_memory(job.plan, images // job.images, img2img=False)
        except RenderError:
            return False
        return True

    def _render(self, batch: list[Job]) -> None:
        first = batch[0]
        served = self.models[first.model]
        now = time.monotonic()
        for job in batch:
            self._observe("queue_seconds", now - job.created)
        plan = first.plan
        negatives = None if first.negative_prompt is None else [j.negative_prompt or "" for j in batch]
        callback = self._step_callback(batch, served)
        start = time.perf_counter()
        try:
            out = served.pipeline(
                [j.prompt for j in batch], negative_prompt=negatives, num_inference_steps=plan.steps,
                guidance_scale=plan.guidance_scale, height=plan.height, width=plan.width,
                num_images_per_prompt=plan.images_per_prompt,
                seed=[j.plan.seed for j in batch] if first.image is None else plan.seed, sampler=plan.sampler,
                schedule=plan.schedule, image=first.image, strength=plan.strength or 0.8, eta=plan.eta,
                noise=plan.noise, callback=callback)
        except RenderError as e:
            for job in batch:
                _fail(job, e)
            return
        seconds = time.perf_counter() - start
        images = sum(j.images for j in batch)
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / images
        self._observe("timings", out.timings)
        self._observe("batch_images", images)
        now = time.monotonic()
        done = 0
        for job in batch:
            mine = list(out.images[done:done + job.images])
            done += job.images
            if job.expired(now) or out.interrupted:
                _fail(job, JobStopped(job.stopped or "cancelled"))
            else:
                _settle(job, (mine, {"timings": out.timings, "plan": out.plan, "batch": len(batch)}))

    def _step_callback(self, batch: list[Job], served: Served) -> Callable[[int, int, np.ndarray], bool | None]:
        """Stops the render when every job in it is cancelled or out of time; sends the previews asked for."""
        schedule = {id(job): job.partial_steps() for job in batch}

        def callback(step: int, total: int, latents: np.ndarray) -> bool | None:
            now = time.monotonic()
            if self._stop_all or all(job.expired(now) for job in batch):
                return False
            done, offset = step + 1, 0
            for job in batch:
                steps = schedule[id(job)]
                if job.on_partial is not None and served.preview is not None and done in steps and not job.stopped:
                    job.on_partial(job, steps.index(done), served.preview(latents[offset:offset + job.images]))
                offset += job.images
            return None

        return callback


def _fail(job: Job, error: BaseException) -> None:
    try:
        job.future.set_exception(error)
    except InvalidStateError:  # the request gave up on it first (a client gone, a timeout)
        pass


def _settle(job: Job, result: tuple[list[Image.Image], dict[str, Any]]) -> None:
    try:
        job.future.set_result(result)
    except InvalidStateError:
        pass
