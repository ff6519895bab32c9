"""The queue: jobs wait in one FIFO, one worker thread per device takes them in turn.

A worker owns its loaded pipeline (kept by model path; a request for another model replaces it),
runs the request through :meth:`GenerationRequest.results` (the one generation path), reports each
step (with a preview every few steps) and stops at the next step once asked to cancel. Every
finished image is saved through :mod:`controldiff.outputs` (claimed numbered names, written
atomically, never overwritten), its settings in the PNG.
"""
from __future__ import annotations

import concurrent.futures
import io
import queue
import secrets
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Job", "JobStore", "Worker", "resolve_device"]

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
FINISHED = (DONE, CANCELLED, FAILED)


@dataclass
class Job:
    """One request in the queue and what became of it. ``pngs`` (the encoded images, the one cut
    short by a cancel included) is kept only for callers that wait for the images (A1111's API)."""

    request: Any                         # a parsed GenerationRequest
    num_images: int
    keep_pngs: bool = False
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = QUEUED
    step: int = 0
    total_steps: int = 0
    image_index: int = 0
    preview: Optional[str] = None
    images: list = field(default_factory=list)   # {"file", "url", "parameters", "seed"}
    pngs: list = field(default_factory=list)     # (png bytes, Result)
    error: Optional[str] = None
    created: float = field(default_factory=time.time)
    started: Optional[float] = None
    finished_at: Optional[float] = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def describe(self, output_url: str) -> dict:
        """The native API's view of the job."""
        return {"id": self.id, "state": self.state, "step": self.step, "total_steps": self.total_steps,
                "image_index": self.image_index, "num_images": self.num_images, "preview": self.preview,
                "images": [{"url": f"{output_url}/{i['file']}", "parameters": i["parameters"], "seed": i["seed"]}
                           for i in self.images],
                "error": self.error}


class JobStore:
    """Jobs by id, and the queue they wait in. Finished jobs beyond ``keep`` are forgotten,
    oldest first (their images stay in the outputs folder)."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.jobs: "OrderedDict[str, Job]" = OrderedDict()
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self.lock = threading.Lock()
        self.last: Optional[Job] = None   # the job that started last (A1111's /progress)

    def submit(self, job: Job) -> Job:
        with self.lock:
            self.jobs[job.id] = job
            finished = [k for k, j in self.jobs.items() if j.state in FINISHED]
            for k in finished[:max(0, len(finished) - self.keep)]:
                del self.jobs[k]
        self.queue.put(job)
        return job

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.jobs.get(job_id)

    def running(self) -> list[Job]:
        with self.lock:
            return [j for j in self.jobs.values() if j.state == RUNNING]

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop: a queued job never starts, a running one stops after its step."""
        job.cancel_requested.set()


def resolve_device(name: str):
    """``auto``: cuda if available, else cpu; anything else is checked usable here."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    torch.empty(0, device=dev)
    return dev


class Worker(threading.Thread):
    """Takes jobs from ``store.queue`` and runs them on one device."""

    def __init__(self, store: JobStore, device: str, dtype: str, outputs, output_url: str,
                 preview_every: int = 2, load: Optional[Callable] = None):
        super().__init__(name=f"controldiff-worker-{device}", daemon=True)
        self.store = store
        self.device_name = device
        self.dtype = dtype
        self.outputs = outputs
        self.output_url = output_url
        self.preview_every = preview_every
        self.load = load or self._load
        self.pipes: dict[Optional[Path], Any] = {}

    def _load(self, model: Optional[Path]):
        from ..pipeline import Pipeline

        if model is None:
            from ..demo import default_model_path

            model = default_model_path()
        pipe = Pipeline.from_pretrained(model, device=resolve_device(self.device_name), dtype=self.dtype)
        pipe.progress = False
        return pipe

    def pipeline(self, model: Optional[Path]):
        """The pipeline for ``model``, loaded once; another model replaces it (one in memory)."""
        if model not in self.pipes:
            self.pipes.clear()
            self.pipes[model] = self.load(model)
        return self.pipes[model]

    def run(self) -> None:
        while True:
            job = self.store.queue.get()
            if job is None:           # shut down: pass the signal on to the next worker
                self.store.queue.put(None)
                return
            self.work(job)

    def work(self, job: Job) -> None:
        if job.cancel_requested.is_set():
            return self._finish(job, CANCELLED)
        with self.store.lock:
            job.state, job.started = RUNNING, time.time()
            self.store.last = job
        try:
            pipe = self.pipeline(job.request.model)
            cancelled = False
            for r in job.request.results(pipe, on_step=self._on_step(job, pipe)):  # each saved when done
                self._keep(job, r)
                cancelled = cancelled or r.cancelled
            self._finish(job, CANCELLED if cancelled or job.cancel_requested.is_set() else DONE)
        except Exception as e:  # the job fails, the worker goes on with the next one
            traceback.print_exc()
            job.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            self._finish(job, FAILED)

    def _on_step(self, job: Job, pipe):
        from .preview import preview_png

        def on_step(image_index: int, step: int, total_steps: int, latents) -> Optional[bool]:
            job.image_index, job.step, job.total_steps = image_index, step, total_steps
            if self.preview_every and (step % self.preview_every == 0 or step == total_steps):
                try:
                    job.preview = preview_png(pipe, latents)
                except Exception:  # a preview never costs the image
                    job.preview = None
            return False if job.cancel_requested.is_set() else None

        return on_step

    def _keep(self, job: Job, result) -> None:
        """Encode the image with its settings; save it unless it was cut short."""
        from ..png import write_png

        buf = io.BytesIO()
        write_png(result.image, buf, result.parameters)
        data = buf.getvalue()
        if job.keep_pngs:
            job.pngs.append((data, result))
        if result.cancelled:
            return
        path = self.outputs.save(len(job.images), result.seed, lambda f: f.write(data))
        job.images.append({"file": path.name, "parameters": result.parameters, "seed": result.seed})

    def _finish(self, job: Job, state: str) -> None:
        with self.store.lock:
            job.state, job.finished_at = state, time.time()
        if not job.future.done():
            job.future.set_result(job)
