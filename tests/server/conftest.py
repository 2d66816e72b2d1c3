"""Fixtures for the server's tests: apps over the tiny SD model, and a real uvicorn on 127.0.0.1.

Every server binds the loopback address on a free port and is stopped by its fixture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # srv, the helpers

from srv import config, running  # noqa: E402

from t2i.server import Limits, create_app  # noqa: E402


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, lora_file):
    folder = tmp_path_factory.mktemp("loras")
    (folder / "ink.safetensors").write_bytes(lora_file.read_bytes())
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_sd):
    """A --model-dir with a copy of the tiny model under another name."""
    import shutil

    folder = tmp_path_factory.mktemp("model-dir")
    shutil.copytree(tiny_sd, folder / "other-sd")
    (folder / "evil.ckpt").write_bytes(b"not listed: pickles never are")
    return folder


@pytest.fixture(scope="session")
def embedding_dir(tmp_path_factory):
    from safetensors.torch import save_file
    import torch

    folder = tmp_path_factory.mktemp("embeddings")
    save_file({"emb_params": torch.zeros(2, 32)}, str(folder / "shiny.safetensors"))
    return folder


@pytest.fixture
def make_client(tiny_sd):
    """make_client(**ServerConfig fields) -> a started TestClient over the tiny model (closed after the test)."""
    from fastapi.testclient import TestClient

    clients = []

    def make(**overrides):
        client = TestClient(create_app(config(tiny_sd, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def client(tiny_sd, lora_dir, model_dir, embedding_dir):
    """One TestClient for tests that leave the server as they found it (tiny model, LoRA/model/embedding dirs)."""
    from fastapi.testclient import TestClient

    app = create_app(config(tiny_sd, lora_dir=lora_dir, model_dir=model_dir, embedding_dir=embedding_dir,
                            limits=Limits(max_steps=4000)))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def live(tiny_sd, lora_dir, model_dir):
    """live(**ServerConfig fields) -> base URL of a real uvicorn over the tiny model (stopped after the test)."""
    stack = []

    def start(**overrides):
        cm = running(create_app(config(tiny_sd, **({"lora_dir": lora_dir, "model_dir": model_dir} | overrides))))
        url = cm.__enter__()
        stack.append(cm)
        return url

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)
