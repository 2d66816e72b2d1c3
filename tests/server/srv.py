"""Helpers the server's tests share (imported as `srv`; tests/server is on sys.path via its conftest)."""

from __future__ import annotations

import base64
import dataclasses
import io
import socket
import threading
import time
from contextlib import contextmanager

from PIL import Image

from t2i.server import ServerConfig

FAST = {"steps": 2, "width": 32, "height": 32}  # what a mechanics test asks of the tiny model


def config(tiny_sd, **overrides) -> ServerConfig:
    base = dict(model=str(tiny_sd), device="cpu")
    return ServerConfig(**(base | overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, port: int | None = None):
    """A real uvicorn serving `app` on 127.0.0.1 in a thread; yields its base URL; always stopped."""
    import uvicorn

    from t2i.server.http import uvicorn_options

    port = port or free_port()
    config = dataclasses.replace(app.state.server.config, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(config)))  # as `t2i serve` runs it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def wait_until(predicate, timeout: float = 30.0, every: float = 0.02):
    """Poll until predicate() is truthy (returns it); fails the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
