"""The job queue: one worker thread per device runs jobs in the order they came.

With `--devices cuda:0,cuda:1` there are two workers, each with its own engine
(its own copy of the model on its own device), taking jobs from the one queue:
two jobs run at once, and each gives the pixels it would give alone.

Routes never generate on the event loop: they submit a `Job` and await its
future. The worker reports each denoising step into the job (progress, the
latents for a live preview) and checks the job's interrupt and skip flags there,
so an interrupt stops a job within a step. A queued job whose client went away
is dropped before it starts. Finished jobs are kept in a short history (their
images only until fetched, or for async jobs until evicted), so memory does not
grow with the number of requests.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from t2i.server import engine as core

QUEUED, RUNNING, DONE, FAILED, INTERRUPTED, CANCELLED = "queued", "running", "done", "failed", "interrupted", "cancelled"
FINISHED = (DONE, FAILED, INTERRUPTED, CANCELLED)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class JobError(Exception):
    """A job failed with a message for the client and the HTTP status to send it with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Job:
    id: str
    kind: str  # generate | load
    request: Any  # engine.GenRequest, or a registry.Checkpoint for "load"
    meta: dict = field(default_factory=dict)  # what the route needs to answer (echoed parameters, ...)
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    iteration: int = 0
    iterations: int = 1
    interrupted: bool = False
    skipped: bool = False
    preview_wanted: bool = False
    preview_step: int = -1
    preview_png: bytes | None = None
    output: core.Output | None = None
    error: JobError | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    version: int = 0  # bumped on every change, for the event stream
    worker: int | None = None  # a job for one worker only (the per-device loads); None: whichever is free
    device: str | None = None  # where it ran
    _latents: Any = None

    @property
    def progress(self) -> float:
        if self.state in FINISHED:
            return 1.0
        if self.state == QUEUED or not self.steps:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.steps) / max(self.iterations, 1))

    @property
    def eta(self) -> float:
        """Seconds left, from the time per share of progress so far (A1111's eta_relative)."""
        p = self.progress
        if self.state != RUNNING or not p or self.started is None:
            return 0.0
        elapsed = time.time() - self.started
        return max(0.0, elapsed / p - elapsed)

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "progress": round(self.progress, 4),
                "eta_relative": round(self.eta, 3), "step": self.step, "steps": self.steps,
                "iteration": self.iteration, "iterations": self.iterations, "created": self.created,
                "started": self.started, "finished": self.finished,
                "error": self.error.message if self.error else None}


def new_id() -> str:
    return f"task({secrets.token_hex(8)})"


class JobQueue:
    """Jobs waiting (at most `max_waiting`), the running ones (one per worker), and a short history."""

    def __init__(self, engines: core.Engine | list[core.Engine], max_waiting: int = 16, history: int = 64,
                 on_loaded: Callable[[str, dict], None] | None = None, preview_every: float = 1.0):
        self.engines = engines if isinstance(engines, list) else [engines]
        self.max_waiting = max_waiting
        self.history = history
        self.on_loaded = on_loaded
        self.preview_every = preview_every
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # live and recent jobs by id, oldest first
        self._running: dict[int, Job] = {}  # worker -> its job
        self._stop = False
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"t2i-worker-{i}", daemon=True)
                         for i in range(len(self.engines))]

    @property
    def engine(self) -> core.Engine:
        return self.engines[0]

    @property
    def running(self) -> list[Job]:
        """The running jobs, oldest first."""
        with self._cond:
            return sorted(self._running.values(), key=lambda j: j.started or 0)

    @property
    def current(self) -> Job | None:
        """The oldest running job (A1111 has one; with several workers, its progress is this one's)."""
        running = self.running
        return running[0] if running else None

    def start(self) -> None:
        """Start the worker threads (the app does, when it starts serving)."""
        for thread in self._threads:
            if not thread.is_alive():
                thread.start()

    # ------------------------------------------------------------------ clients' side

    def submit(self, job: Job) -> Job:
        with self._cond:
            if job.id in self._jobs and self._jobs[job.id].state not in FINISHED:
                raise JobError(409, f"a job with id {job.id!r} is already queued or running; choose another "
                                    "force_task_id")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(self.retry_after())
            self._jobs.pop(job.id, None)
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._trim()
            self._cond.notify_all()
        return job

    def retry_after(self) -> int:
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 5.0
        return max(1, int(typical * (len(self._waiting) + 1) / len(self.engines) + 0.5))

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def position(self, job: Job) -> int:
        """0 for the running job, 1.. for waiting ones (1 is next), -1 when finished."""
        with self._cond:
            if job.state == RUNNING:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return -1

    def cancel(self, job: Job) -> None:
        """Drop a waiting job; interrupt a running one."""
        with self._cond:
            if job.state == QUEUED and job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, CANCELLED, error=JobError(410, "the job was cancelled before it started"))
                return
        if job.state == RUNNING:
            job.interrupted = True

    def interrupt(self, job: Job | None = None) -> None:
        """Interrupt `job`, or (A1111's /interrupt, which names no job) every running one."""
        for job in [job] if job is not None else self.running:
            if job.state == RUNNING:
                job.interrupted = True
                job.version += 1

    def skip(self) -> None:
        for job in self.running:
            if job.state == RUNNING:
                job.skipped = True

    def release(self, job: Job) -> None:
        """The client has what it asked for: forget the images (the status stays in the history)."""
        job.output = None
        job.preview_png = None
        job._latents = None
        if job.kind == "generate":  # the uploads too: a finished job keeps only what its status needs
            job.request.init_image = job.request.mask = None

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in list(self._waiting):
                self._finish(job, CANCELLED, error=JobError(503, "the server is shutting down"))
            self._waiting.clear()
            self._cond.notify_all()
        for job in self.running:
            job.interrupted = True
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=30)

    # ------------------------------------------------------------------ live preview

    def preview(self, job: Job) -> bytes | None:
        """The newest preview PNG of a running job; asks the worker for a fresh one."""
        job.preview_wanted = True
        return job.preview_png

    def _maybe_preview(self, job: Job, task: str, engine: core.Engine) -> None:
        if not job.preview_wanted or job._latents is None or job.preview_step == job.step:
            return
        # at most one decode per `preview_every` seconds, and never more than a sixth of the job's time
        wait = max(self.preview_every, 5 * job.meta.get("_preview_cost", 0.0))
        if job.preview_png is not None and time.time() - job.meta.get("_preview_at", 0) < wait:
            return
        t0 = time.time()
        try:
            image = engine.preview(task, job._latents)
        except Exception:  # a preview is a courtesy: never fail the job for it
            return
        job.meta["_preview_cost"] = time.time() - t0
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        job.preview_png = buf.getvalue()
        job.preview_step = job.step
        job.meta["_preview_at"] = time.time()
        job.preview_wanted = False

    # ------------------------------------------------------------------ worker

    def _next(self, worker: int) -> Job | None:
        """The first waiting job this worker may take (unpinned, or pinned to it); called under the lock."""
        for job in self._waiting:
            if job.worker is None or job.worker == worker:
                self._waiting.remove(job)
                return job
        return None

    def _work(self, worker: int) -> None:
        engine = self.engines[worker]
        while True:
            with self._cond:
                while not self._stop and (job := self._next(worker)) is None:
                    self._cond.wait()
                if self._stop:
                    return
                job.state, job.started, job.device = RUNNING, time.time(), engine.device
                self._running[worker] = job
                job.version += 1
            try:
                self._run(job, engine)
            except JobError as e:
                self._finish(job, FAILED, error=e)
            except core.T2IError as e:
                usage = isinstance(e, core.UsageError)
                message = str(e) if usage else f"{type(e).__name__}: {e}"
                if isinstance(e, core.UnsafeFileError):  # the CLI's way out is not the server's
                    message = re.sub(r"[,;]? (or )?pass (allow_pickle / )?--allow-pickle[^;)]*", "", message)
                    message += " (t2i serve never loads pickles)"
                self._finish(job, FAILED, error=JobError(422 if usage else 500, message))
            except Exception as e:  # the worker must live on; the client gets the one line
                self._finish(job, FAILED, error=job_error(e, engine))
            finally:
                with self._cond:
                    self._running.pop(worker, None)
                    self._cond.notify_all()

    def _run(self, job: Job, engine: core.Engine) -> None:
        if job.kind == "load":
            self._load(job.request, engine)
            self._finish(job, DONE)
            return
        req = job.request
        self._load(job.meta["checkpoint"], engine)
        job.iterations = req.n_iter

        def hook(step: int, total: int, latents) -> None:
            job.step, job.steps, job._latents = step, total, latents
            job.version += 1
            if job.interrupted:
                raise core.Interrupted()
            if job.skipped:
                job.skipped = False
                raise core.Skipped()
            self._maybe_preview(job, req.task, engine)

        def on_iteration(k: int) -> None:
            job.iteration, job.step = k, 0
            job.version += 1

        engine.hook = hook
        t0 = time.time()
        try:
            if job.interrupted:  # interrupted before it started: nothing to run
                output = core.Output(interrupted=True)
            else:
                output = engine.run(req, on_iteration)
        finally:
            engine.hook = None
            job._latents = None
        self._durations.append(time.time() - t0)
        job.output = output
        self._finish(job, INTERRUPTED if output.interrupted else DONE)

    def _load(self, checkpoint, engine: core.Engine) -> None:
        if engine.loaded == checkpoint.name:
            return
        engine.load(checkpoint.name, checkpoint.location)
        if self.on_loaded is not None:
            self.on_loaded(checkpoint.name, engine.model_info)

    def _finish(self, job: Job, state: str, error: JobError | None = None) -> None:
        job.state, job.finished, job.error = state, time.time(), error
        if job.kind == "load" and error is not None:  # nobody may be waiting for it (the start-up load)
            logging.getLogger("t2i.server").warning(f"loading {job.request.name} failed: {error.message}")
        job.version += 1
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(job)

    def _trim(self) -> None:
        """Keep at most `history` finished jobs (oldest go first); live ones always stay."""
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for job in finished[: max(0, len(finished) - self.history)]:
            del self._jobs[job.id]


def job_error(e: Exception, engine: core.Engine) -> JobError:
    """The one line a client gets for an unexpected failure inside a job; running out of memory says so and
    what to do (and the device's cache is emptied, so the next job starts from a clean slate)."""
    if core.is_out_of_memory(e):
        core.free_memory(engine.device)
        return JobError(500, f"out of memory on {engine.device} while running the job; ask for fewer or smaller "
                             "images, or fewer steps at once")
    return JobError(500, f"{type(e).__name__}: {e}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
