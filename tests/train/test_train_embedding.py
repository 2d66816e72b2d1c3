"""`t2i train embedding`: textual inversion on the one training loop, on the tiny model (mechanics)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import one_line, weights
from t2i import metadata
from t2i.embeddings import read
from t2i.train import embedding

ARGS = dict(token="zorb", vectors=2, steps=4, batch=2, lr=1e-2, checkpoint_every=2, init_words="red circle")


def cfg(tiny_sd, data, out, **kw) -> dict:
    return {"model": str(tiny_sd), "data": str(data), "output": str(out), **ARGS, **kw}


@pytest.fixture(scope="module")
def trained(tiny_sd, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "run"
    return embedding.run(None, cfg(tiny_sd, data, out)), out


def test_run_writes_an_a1111_layout_file_that_only_the_vectors_made(trained, sd_pipe):
    path, out = trained
    assert path == out / "zorb.safetensors" and (out / "train_log.jsonl").is_file()
    (key,) = weights(path)
    vec = weights(path)[key]
    assert key == "emb_params" and vec.shape == (2, 32)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["t2i.token"] == "zorb" and meta["t2i.vectors"] == "2" and meta["t2i.steps"] == "4"
    start = embedding.initial_vectors(sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder, "red circle", 2)
    assert not torch.equal(vec, start)  # trained away from the initial words
    assert torch.equal(read(path)[""], vec)


def test_the_file_calls_its_vectors_by_name_in_generate(trained, tiny_sd, run_cli, tmp_path):
    _, out = trained
    code, stdout, err = run_cli("generate", "a square, zorb", "--model", tiny_sd, "--embedding-dir", out,
                                "--steps", "1", "-q", "--out", tmp_path / "o")
    assert code == 0, err
    assert [e.name for e in metadata.read(stdout.split()[0])[1].embeddings] == ["zorb"]


def test_resume_gives_the_vectors_of_a_straight_run(trained, tiny_sd, data, tmp_path):
    path, out = trained
    copy = shutil.copytree(out, tmp_path / "run")
    (copy / "zorb.safetensors").unlink()
    shutil.rmtree(copy / "checkpoints" / "step-00000004", ignore_errors=True)
    ckpts = sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name.startswith("step"))
    assert ckpts and ckpts[-1].endswith("2"), ckpts  # resumes from step 2
    again = embedding.run(None, cfg(tiny_sd, data, copy), resume="latest")
    assert torch.equal(weights(again)["emb_params"], weights(path)["emb_params"])


@pytest.mark.parametrize("extra, message", [
    ({"token": ""}, "--token"),
    ({"token": "a,b"}, "--token"),
    ({"vectors": 0}, "--vectors must be at least 1"),
    ({"vectors": 80}, "--vectors 80"),
    ({"lr": 0}, "--lr must be a positive number"),
])
def test_bad_settings_are_refused_before_loading(tiny_sd, data, tmp_path, no_model_load, run_cli, extra, message):
    c = cfg(tiny_sd, data, tmp_path / "o", **extra)
    code, out, err = run_cli("train", "embedding", "--model", c["model"], "--data", c["data"], "--output",
                             c["output"], "--token", c["token"], "--vectors", c["vectors"], "--lr", c["lr"])
    assert code == 2 and out == "" and message in one_line(err), err


def test_a_finished_run_is_never_overwritten(trained, tiny_sd, data, run_cli, no_model_load):
    _, out = trained
    code, _, err = run_cli("train", "embedding", "--model", tiny_sd, "--data", data, "--output", out, "--token", "zorb")
    assert code == 2 and "exists" in one_line(err)


def test_eval_style_measures_an_embedding(trained, sd_pipe, run_cli, tmp_path):
    from t2i.demo import shapeeval
    from t2i.demo.styles import embedding_eval

    path, _ = trained
    prompts = shapeeval.build_prompts()[:2]
    rows = embedding_eval(sd_pipe, path, "pastel", prompts=prompts, seeds=(0,))
    assert list(rows) == ["style data", "style data through the VAE (ceiling)", "base", "base + the name as a word",
                          "embedding"]
    assert "share_of_ceiling" in rows["embedding"]
    assert not sd_pipe.embeddings.files and not sd_pipe.embeddings.dirs  # the pipeline's own set is back
    code, _, err = run_cli("eval", "--style", "pastel", "--embedding", tmp_path / "none.safetensors")
    assert code == 2 and "does not exist" in one_line(err)
