"""`t2i train lora` on the tiny SD model: output, resume, faults, processes, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import REPO, lora_args as _args, lora_cfg as _cfg, one_line, pixels, weights as _weights
from t2i.errors import UsageError
from t2i.train import lora
from t2i.train.checkpoint import Checkpoints

@pytest.fixture(scope="module")
def trained(tiny_sd, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    lora.run(None, _cfg(tiny_sd, data, out, steps=6))
    return out


def test_run_writes_lora_grid_log_and_metadata(trained, tiny_sd):
    from t2i.models.sources import model_hash, resolve

    final = trained / "lora.safetensors"
    sd = _weights(final)  # kohya's layout by default: the one A1111, ComfyUI and diffusers all read
    assert sd and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                      for k in sd)
    assert all(torch.isfinite(v).all() for v in sd.values())
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["t2i.rank"] == "2" and meta["t2i.alpha"] == "2.0" and meta["t2i.steps"] == "6"
    assert meta["t2i.trigger"] == "in sks style"
    assert meta["t2i.base_model_hash"] == model_hash(resolve(str(tiny_sd)), Path(tiny_sd))
    assert meta["ss_network_alpha"] == "2" and meta["t2i.training_alpha"] == "2.0"  # folded alpha = rank
    log = [json.loads(l) for l in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["ranks_identical"] is True and log[-1]["processes"] == 1
    assert [s for s, _ in Checkpoints(trained / "checkpoints").all()] == [4, 6]  # keep 2, pruned after


def test_stock_diffusers_loads_it_and_it_changes_the_image(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a square, in sks style", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    before = image()
    pipe.load_lora_weights(str(trained / "lora.safetensors"))
    assert abs(image() - before).max() > 1e-3


def test_t2i_generate_applies_it_with_a_scale(trained, tiny_sd, run_cli, tmp_path):
    def make(name, *extra):
        code, out, err = run_cli("generate", "a square, in sks style", "--model", tiny_sd, "--steps", 2, "--seed", 0,
                                 "--out", tmp_path / name, "-q", *extra)
        assert code == 0, err
        return pixels(Image.open(tmp_path / name))

    plain = make("plain.png")
    assert abs(make("one.png", "--lora", f"{trained / 'lora.safetensors'}:1") - plain).max() > 0
    assert abs(make("zero.png", "--lora", f"{trained / 'lora.safetensors'}:0") - plain).max() == 0


def test_resume_after_a_stop_gives_the_same_weights(tiny_sd, data, trained, tmp_path):
    out = tmp_path / "halves"
    lora.run(None, _cfg(tiny_sd, data, out, steps=3, checkpoint_every=3))
    assert [s for s, _ in Checkpoints(out / "checkpoints").all()] == [3]
    (out / "lora.safetensors").unlink()  # the first half's output; resume continues the checkpoint
    lora.run(None, _cfg(tiny_sd, data, out, steps=6), resume="latest")
    straight, resumed = _weights(trained / "lora.safetensors"), _weights(out / "lora.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)


def _launch(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "t2i.cli", "train", "lora", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if log.is_file() and sum(1 for l in log.read_text().splitlines() if '"step"' in l) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_run_resumes_to_the_same_weights(tiny_sd, data, tmp_path, sig):
    every = 1000 if sig == signal.SIGINT else 1  # Ctrl-C must save by itself; kill -9 relies on the periodic ones
    cfg = _cfg(tiny_sd, data, tmp_path / "out", steps=100_000, checkpoint_every=every)
    proc = _launch(_args(cfg))
    _wait_for_step(tmp_path / "out" / "train_log.jsonl", 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    saved = Checkpoints(tmp_path / "out" / "checkpoints").all()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "--resume latest" in err and "Traceback" not in err
        assert len(saved) == 1 and saved[0][0] >= 2  # only the interrupt saved (checkpoint_every is 1000)
    else:
        assert proc.returncode == -signal.SIGKILL and saved
    total = saved[-1][0] + 2  # resume for two more steps, then compare with a straight run that long
    lora.run(None, {**cfg, "steps": total}, resume="latest")
    lora.run(None, {**cfg, "steps": total, "output": str(tmp_path / "straight")})
    straight, resumed = _weights(tmp_path / "straight" / "lora.safetensors"), _weights(tmp_path / "out" / "lora.safetensors")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tiny_sd, data, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    calls = {"n": 0}
    original = UNet2DConditionModel.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in poison:
            out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", poisoned)
    poison = {2}  # the second training step's forward (no prior images: drawing them runs the UNet too)
    out = tmp_path / "once"
    lora.run(None, _cfg(tiny_sd, data, out, steps=4, prior=False))
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines() if '"step"' in l]
    assert [r["skipped"] for r in log] == [False, True, False, False]
    assert all(torch.isfinite(v).all() for v in _weights(out / "lora.safetensors").values())

    calls["n"], poison = 0, set(range(3, 100))
    out = tmp_path / "always"
    with pytest.raises(lora.TrainingError, match=r"3 non-finite steps in a row at step 5.*\(step 4\)"):
        lora.run(None, _cfg(tiny_sd, data, out, steps=8, max_bad_steps=3, prior=False))
    saved = Checkpoints(out / "checkpoints").all()
    assert [s for s, _ in saved] == [2, 4]  # skipped steps leave the weights as they were: finite
    for _, folder in saved:
        assert all(torch.isfinite(v).all() for v in load_file(str(folder / "rng_and_tensors.safetensors")).values())
    assert not (out / "lora.safetensors").exists()


def test_text_encoder_kohya_output_and_loss_options(tiny_sd, data, tmp_path, run_cli):
    out = tmp_path / "te"
    lora.run(None, _cfg(tiny_sd, data, out, steps=2, train_text_encoder=True, gradient_checkpointing=True,
                        noise_offset=0.1, caption_dropout=0.5, cache_latents=False, grad_accum=2, buckets=False,
                        format="kohya", mixed_precision="bf16"))
    keys = _weights(out / "lora.safetensors").keys()
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    code, _, err = run_cli("generate", "a square, in sks style", "--model", tiny_sd, "--steps", 2, "-q",
                           "--out", tmp_path / "x.png", "--lora", out / "lora.safetensors")
    assert code == 0, err


def test_two_cpu_processes_end_with_identical_weights(tiny_sd, data, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "ddp"
    cfg = _cfg(tiny_sd, data, out, steps=3, checkpoint_every=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --multi_gpu picks accelerate's torchrun launcher, which runs CPU processes too (gloo); its --cpu flag
    # would pick the single-process/MPI launcher instead
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "t2i.cli", "train", "lora", *_args(cfg)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [str(out / "lora.safetensors")]  # printed once, by the main process
    done = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert done["processes"] == 2 and done["ranks_identical"] is True
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["t2i.batch"] == "4"  # 2 per process x 2 processes


@pytest.mark.parametrize("extra, message", [
    (dict(data="EMPTY"), "no usable images"),
    (dict(mixed_precision="fp16"), "needs a CUDA GPU"),
    (dict(rank=0), "--rank must be at least 1"),
    (dict(format="ckpt"), "--format 'ckpt'"),
    (dict(targets="mlp"), "--targets 'mlp'"),
])
def test_bad_settings_are_refused_before_loading(tiny_sd, data, tmp_path, no_model_load, extra, message):
    if extra.get("data") == "EMPTY":
        (tmp_path / "empty").mkdir()
        data, extra = tmp_path / "empty", {}
    if extra.get("mixed_precision") and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    with pytest.raises(UsageError, match=message):
        lora.run(None, _cfg(tiny_sd, data, tmp_path / "o", **extra))


def test_an_earlier_run_is_never_overwritten(trained, tiny_sd, data, run_cli, no_model_load):
    code, _, err = run_cli("train", "lora", "--model", tiny_sd, "--data", data, "--output", trained)
    assert code == 2 and "exists (a finished run)" in one_line(err)
    (trained / "lora.safetensors").rename(trained / "kept.safetensors")
    try:
        code, _, err = run_cli("train", "lora", "--model", tiny_sd, "--data", data, "--output", trained)
        assert code == 2 and "--resume latest" in one_line(err)
    finally:
        (trained / "kept.safetensors").rename(trained / "lora.safetensors")


def test_config_file_keys_and_flags_override_them(tmp_path):
    cfg = lora.load(str(REPO / "train" / "configs" / "lora.toml"), {"rank": 8, "lr": None})
    assert cfg.rank == 8 and cfg.lr == 3e-3 and cfg.trigger == "in sks style"  # None = flag not given
    (tmp_path / "bad.toml").write_text("rnak = 4\n")
    with pytest.raises(UsageError, match="unknown config key rnak"):
        lora.load(str(tmp_path / "bad.toml"), {})


def test_eval_style_prints_the_table_and_scale_0_is_the_base(trained, tiny_sd, run_cli, tmp_path):
    code, out, err = run_cli("eval", "--style", "pastel", "--model", tiny_sd, "--lora", trained / "lora.safetensors",
                             "--trigger", "in sks style", "--seeds", 1, "--steps", 2, "-q", "--out", tmp_path)
    assert code == 0, err
    rows = json.loads((tmp_path / "style-eval.json").read_text())
    assert list(rows) == ["style data", "style data through the VAE (ceiling)", "base", "base + trigger words",
                          "lora + trigger", "lora, no trigger", "lora at scale 0 + trigger"]
    assert rows["lora at scale 0 + trigger"] == rows["base + trigger words"]
    assert rows["lora + trigger"]["style"] != rows["base + trigger words"]["style"]
    share = (rows["lora + trigger"]["style"] - rows["base"]["style"]) / (
        rows["style data through the VAE (ceiling)"]["style"] - rows["base"]["style"])
    assert rows["lora + trigger"]["share_of_ceiling"] == pytest.approx(share)
    assert "lora + trigger" in out and "ShapeEval" in out and f"(ceiling - base): {share:.0%}" in out


def test_an_image_broken_mid_run_is_skipped_and_reported(tiny_sd, data, tmp_path, monkeypatch, caplog):
    import shutil

    copy = Path(shutil.copytree(data, tmp_path / "data"))
    original = lora.Encoder.cache

    def cache_then_break(self):  # after the scan vetted every file, one goes bad
        original(self)
        (copy / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    monkeypatch.setattr(lora.Encoder, "cache", cache_then_break)
    path = lora.run(None, _cfg(tiny_sd, copy, tmp_path / "out", steps=6, cache_latents=False))
    skipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "0.png is not a readable image" in skipped[0]
    assert all(torch.isfinite(v).all() for v in _weights(path).values())


def test_validation_grid_is_labelled_per_row(trained):
    """One row per prompt x (without, with the trigger), each under a band of text saying which, and the step."""
    grid = np.asarray(Image.open(trained / "validation.png").convert("L")).astype(int)
    assert grid.shape[1] > 32  # as wide as its labels, not just one 32-px image
    band = (grid.shape[0] - 2 * 32) // 2
    assert grid.shape[0] == 2 * (band + 32) and band >= 8
    labels = [grid[r * (band + 32): r * (band + 32) + band] for r in range(2)]
    assert all((label < 128).sum() > 20 for label in labels)  # dark text on the white band
    assert not np.array_equal(labels[0], labels[1])  # "without trigger" vs "with trigger"


def test_targets_all_trains_the_mlps_and_convolutions_and_stock_diffusers_loads_it(tiny_sd, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "all"
    path = lora.run(None, _cfg(tiny_sd, data, out, steps=2, targets="all", conv_rank=3, conv_alpha=6))
    sd = _weights(path)
    conv = sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv.shape[0] == 3 and conv.shape[2:] == (3, 3)  # a convolution of the conv rank, as kohya writes it
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight" in sd
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in sd
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["t2i.targets"] == "all" and json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3"}
    assert meta["t2i.training_conv_alpha"] == "6.0"

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.load_lora_weights(str(path))
    after = pipe("a square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert abs(after.images[0] - before.images[0]).max() > 1e-4
    n = len({k.rsplit(".", 2)[0] for k in sd})
    assert sum(1 for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A) == n


def test_one_set_of_defaults_cli_config_file_and_python_api(run_cli):
    """lora.toml states the dataclass's defaults (bar its example trigger), and the CLI help reads them."""
    import dataclasses
    import tomllib

    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(lora.LoraTrainConfig)}
    assert (defaults["rank"], defaults["lr"], defaults["batch"], defaults["steps"]) == (16, 3e-3, 8, 400)
    assert defaults["format"] == "kohya"
    assert (defaults["targets"], defaults["prior"], defaults["prior_loss_weight"]) == ("all", True, 0.5)
    toml = tomllib.loads((REPO / "train" / "configs" / "lora.toml").read_text())
    assert {k: v for k, v in toml.items() if k != "trigger"} == {k: defaults[k] for k in toml if k != "trigger"}
    code, help_text, _ = run_cli("train", "lora", "--help")
    assert code == 0
    chunks = re.split(r"\n  (?=-)", help_text.split("options:")[1])
    entries = {e.split()[0]: " ".join(e.split()) for e in chunks if e.strip()}
    for key in ("rank", "steps", "lr", "batch", "format", "targets", "prior_loss_weight"):
        shown = f"{defaults[key]:g}" if isinstance(defaults[key], float) else str(defaults[key])
        assert re.search(rf"\(default {re.escape(shown)}\b", entries["--" + key.replace("_", "-")]), (key, entries["--" + key.replace("_", "-")])


# --------------------------------------------------------------------------- prior preservation (the default)


def _captions(folder: Path) -> list[str]:
    return sorted(p.read_text().strip() for p in folder.glob("*.txt"))


def test_default_run_draws_the_base_models_images_of_the_captions_and_trains_on_them(trained, tiny_sd, data):
    from t2i.pipelines import Text2Image

    drawn = sorted((trained / "prior").glob("*.png"))
    assert len(drawn) == len(list(data.glob("*.png"))) == 6  # one per data image
    assert _captions(trained / "prior") == sorted(_captions(data) + [""])  # without the trigger; "": uncaptioned
    first = (trained / "prior" / "0000.txt").read_text().strip()
    base = Text2Image.from_pretrained(str(tiny_sd), device="cpu", dtype="fp32")
    assert (pixels(base(first, seed=0, steps=2, progress=False).images[0]) == pixels(Image.open(drawn[0]))).all()
    with safe_open(str(trained / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["t2i.regularisation"] == "prior" and meta["t2i.reg_images"] == "6" and meta["t2i.images"] == "6"
    state = json.loads((Checkpoints(trained / "checkpoints").latest() / "state.json").read_text())
    assert state["identity"]["reg_images"] == 6  # they were in the training set


def test_prior_loss_weight_weighs_the_prior_images_and_is_recorded(tiny_sd, data, tmp_path, run_cli):
    """kohya's prior_loss_weight: 0 takes the prior images out of the loss (other weights than at 1); the file says
    the weight (t2i's key and kohya's ss_prior_loss_weight); a negative one is refused before any work."""
    runs = {}
    for w in (1.0, 0.0):
        out = tmp_path / f"w{w:g}"
        lora.run(None, _cfg(tiny_sd, data, out, steps=2, prior_loss_weight=w))
        runs[w] = _weights(out / "lora.safetensors")
        with safe_open(str(out / "lora.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["t2i.prior_loss_weight"] == meta["ss_prior_loss_weight"] == f"{w:g}"
    assert any(not torch.equal(runs[1.0][k], runs[0.0][k]) for k in runs[1.0])


def test_no_prior_trains_on_the_data_alone(tiny_sd, data, tmp_path, run_cli):
    cfg = _cfg(tiny_sd, data, tmp_path / "o", steps=2)
    code, _, err = run_cli("train", "lora", *_args(cfg), "--no-prior")
    assert code == 0, err
    assert not (tmp_path / "o" / "prior").exists()
    with safe_open(str(tmp_path / "o" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["t2i.regularisation"] == "none" and meta["t2i.reg_images"] == "0"
    (tmp_path / "o" / "lora.safetensors").unlink()  # its checkpoint (step 2) stays; resuming it with prior on:
    with pytest.raises(UsageError, match="regularisation=none, this run has regularisation=prior"):
        lora.run(None, _cfg(tiny_sd, data, tmp_path / "o", steps=4), resume="latest")
    assert not (tmp_path / "o" / "prior").exists()  # refused before drawing anything


def test_reg_data_replaces_the_prior_images(tiny_sd, data, tmp_path):
    lora.run(None, _cfg(tiny_sd, data, tmp_path / "o", steps=2, reg_data=str(data)))
    assert not (tmp_path / "o" / "prior").exists()
    with safe_open(str(tmp_path / "o" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["t2i.regularisation"] == "reg-data"


def test_resume_reuses_the_prior_images_and_redraws_only_a_missing_one(tiny_sd, data, tmp_path):
    out = tmp_path / "o"
    lora.run(None, _cfg(tiny_sd, data, out, steps=2, checkpoint_every=2))
    files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "prior").iterdir()}  # a freed inode can be reused
    (out / "prior" / "0002.png").unlink()
    (out / "lora.safetensors").unlink()
    lora.run(None, _cfg(tiny_sd, data, out, steps=4, checkpoint_every=2), resume="latest")
    now = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "prior").iterdir()}
    assert now.keys() == files.keys()
    assert [n for n in files if now[n] != files[n]] == ["0002.png"]  # .txt unchanged: only the image was missing
