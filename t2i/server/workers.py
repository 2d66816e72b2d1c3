"""Worker processes: one `Engine` per device, each in a process of its own (`t2i serve --devices a,b`).

The queue drives a `ProcessEngine` exactly as it drives an in-process `Engine`: `load`, `run` with a step
`hook`, `preview`. Under it, the engine runs in a child process and every denoising step is one round trip
over a pipe: the child reports the step and waits for the queue's word (go on, interrupt, skip, or decode a
preview from the latents it holds), so interrupts, skips, progress and live previews behave as with threads.
What processes add: no Python lock shared between devices, a device's memory (and a CUDA context) owned by
one process, and a worker that dies (killed, out of memory, a crash in a native library) costs the job it
was running, not the server: its job fails with one line, and the next job starts a fresh process.

Children are started with `spawn` (the server has threads; forking those is unsafe).
"""

from __future__ import annotations

import io
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

from t2i.server import engine as core

_GO, _INTERRUPT, _SKIP, _PREVIEW = "go", "interrupt", "skip", "preview"


class WorkerDied(core.T2IError):
    """The worker process ended while it had work."""


class _LatentsThere:
    """Stands for the latents of a running step, which stay in the child: `ProcessEngine.preview` asks it."""


class ProcessEngine:
    """An `Engine` in a child process; same attributes and methods as the queue uses of an `Engine`."""

    def __init__(self, device: str = "auto", lora_dir: Path | None = None, out: Path | None = None,
                 embedding_dir: Path | None = None):
        self.device, self.lora_dir, self.out = device, lora_dir, out
        self.embedding_dir = embedding_dir
        self.speed = core.Engine.speed  # the child's Engine.speed (t2i serve --speed), given when it starts
        self.loaded: str | None = None
        self.location: str | None = None
        self.model_info: dict = {}
        self.hook: Callable | None = None
        self._context = multiprocessing.get_context("spawn")
        self._process = None
        self._conn = None
        self._lock = threading.Lock()  # one conversation with the child at a time

    # ------------------------------------------------------------------ the child's life

    def _ensure(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        parent, child = self._context.Pipe()
        import torch  # deferred: the server imports torch with its first engine anyway

        # the parent's intra-op thread count: CPU kernels round alike only at the same count, so a worker gives
        # the pixels this process would
        threads = torch.get_num_threads()
        self._process = self._context.Process(target=_serve, args=(child, self.device, self.lora_dir, self.out,
                                                                    threads, self.embedding_dir, self.speed),
                                              name=f"t2i-worker-{self.device}", daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        self.loaded, self.location, self.model_info = None, None, {}

    def _recv(self):
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = self._process.exitcode if self._process is not None else None
            if self._process is not None:
                self._process.join(timeout=5)
                code = self._process.exitcode
            self._process = None
            self.loaded, self.location, self.model_info = None, None, {}
            raise WorkerDied(f"the worker process on {self.device} ended (exit code {code}) while running the "
                             "job; it is restarted for the next job") from None

    def _answer(self, message):
        """The child's final answer to a request; its exception raised here."""
        kind, value = message
        if kind == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the child (the server's shutdown)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ------------------------------------------------------------------ what the queue calls

    def load(self, name: str, location: str | None) -> None:
        with self._lock:
            self._ensure()
            if self.loaded == name:
                return
            self._conn.send(("load", name, location))
            self.model_info = self._answer(self._recv())
            self.loaded, self.location = name, location

    def run(self, req: core.GenRequest, on_iteration: Callable[[int], None] | None = None) -> core.Output:
        with self._lock:
            self._ensure()
            self._conn.send(("run", req))
            while True:
                message = self._recv()
                kind = message[0]
                if kind == "iteration":
                    if on_iteration is not None:
                        on_iteration(message[1])
                elif kind == "step":
                    self._conn.send((self._step(message[1], message[2]),))
                else:
                    return self._answer(message)

    def _step(self, step: int, total: int) -> str:
        """The queue's hook on one step of the child; what the child is to do next."""
        if self.hook is None:
            return _GO
        try:
            self.hook(step, total, _LatentsThere())
        except core.Interrupted:
            return _INTERRUPT
        except core.Skipped:
            return _SKIP
        return _GO

    def preview(self, task: str, latents):
        """Called by the queue from within the hook: the child decodes the step's latents it holds."""
        from PIL import Image

        self._conn.send((_PREVIEW, task))
        png = self._answer(self._recv())
        return Image.open(io.BytesIO(png))


def _serve(conn, device: str, lora_dir, out, threads: int, embedding_dir=None, speed: str = "auto") -> None:
    """The child: an `Engine` answering the parent's requests until told to stop (or the pipe closes)."""
    import torch

    torch.set_num_threads(threads)
    engine = core.Engine(device, lora_dir, out, embedding_dir)
    engine.speed = speed
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        kind = message[0]
        if kind == "stop":
            return
        try:
            if kind == "load":
                engine.load(message[1], message[2])
                conn.send(("ok", engine.model_info))
            elif kind == "run":
                engine.hook = _step_hook(conn, engine)
                output = engine.run(message[1], lambda k: conn.send(("iteration", k)))
                conn.send(("ok", output))
        except Exception as e:  # noqa: BLE001 - the parent raises it where the in-process engine would have
            conn.send(("error", _portable(e)))
        finally:
            engine.hook = None


def _step_hook(conn, engine: core.Engine) -> Callable:
    def hook(step: int, total: int, latents) -> None:
        conn.send(("step", step, total))
        while True:
            word = conn.recv()
            if word[0] == _PREVIEW:
                try:
                    buf = io.BytesIO()
                    engine.preview(word[1], latents).save(buf, format="PNG")
                    conn.send(("ok", buf.getvalue()))
                except Exception as e:  # noqa: BLE001 - a preview is a courtesy; the queue ignores its failure
                    conn.send(("error", _portable(e)))
            elif word[0] == _INTERRUPT:
                raise core.Interrupted()
            elif word[0] == _SKIP:
                raise core.Skipped()
            else:
                return

    return hook


def _portable(e: Exception) -> Exception:
    """The exception itself if it survives pickling (t2i's errors, torch's out-of-memory), else its one line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - whatever pickling raises, the one line goes across
        return RuntimeError(f"{type(e).__name__}: {e}")
