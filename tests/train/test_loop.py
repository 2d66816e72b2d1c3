"""The one training loop (train/loop.py) and the losses (train/losses.py): on a toy job in milliseconds, then
what it gave each trainer that only the other had (the non-finite skip in a demo stage, the time budget in the
LoRA trainer), the loss curve and the trackers."""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import lora_cfg
from t2i.train import demo, lora, loop, losses
from t2i.train.checkpoint import Checkpoints

# --------------------------------------------------------------------------- losses


def test_min_snr_weights_are_hang_et_al_with_the_floor_under_the_x0_weight():
    snr = torch.tensor([0.25, 1.0, 5.0, 20.0])
    # Hang et al. 2023: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0
    eps = losses.min_snr_weight(snr, 5.0, "epsilon")
    v = losses.min_snr_weight(snr, 5.0, "v_prediction")
    x0 = losses.min_snr_weight(snr, 5.0, "sample")
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(v, torch.tensor([0.2, 0.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(x0, torch.tensor([0.25, 1.0, 5.0, 5.0]))
    # the floor lifts the x0 weight of the noisiest steps: max(min(SNR, gamma), floor)
    torch.testing.assert_close(losses.min_snr_weight(snr, 5.0, "v_prediction", floor=1.0),
                               torch.tensor([0.8, 0.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(losses.min_snr_weight(snr, 5.0, "epsilon", floor=1.0),
                               torch.tensor([4.0, 1.0, 1.0, 0.25]))


def test_the_diffusion_loss_weighs_each_samples_error_and_gamma_0_turns_weighting_off():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2  # per-sample squared errors 1 and 4
    snr = torch.tensor([1.0, 10.0])
    weighted = losses.diffusion_loss(pred, target, snr, "v_prediction", gamma=5.0)
    assert float(weighted) == pytest.approx((1 * 0.5 + 4 * 5 / 11) / 2)
    assert float(losses.diffusion_loss(pred, target, snr, "v_prediction", gamma=0.0)) == pytest.approx(2.5)
    own = torch.tensor([1.0, 0.25])  # a regularisation image's prior_loss_weight: times the min-SNR weight
    assert float(losses.diffusion_loss(pred, target, snr, "v_prediction", gamma=5.0, weight=own)) == pytest.approx(
        (1 * 0.5 + 0.25 * 4 * 5 / 11) / 2)
    assert float(losses.diffusion_loss(pred, target, snr, "v_prediction", gamma=0.0, weight=own)) == pytest.approx(1)


def test_an_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction type 'flow'"):
        losses.min_snr_weight(torch.ones(1), 5.0, "flow")


# --------------------------------------------------------------------------- a toy job


def _toy(root: Path, steps: int, every: int = 2, grad_accum: int = 1, poison=(), **kw) -> loop.Job:
    """A linear model fitted to noisy targets; its data come from the global RNG, so a resume is only exact if
    the loop restores it. `poison`: steps whose loss is NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.warmup(3))
    truth = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def batches(start: int):
        for _ in itertools.count(start):
            x = torch.randn(8, 4)  # (8, 4)
            y = x @ truth.T + 0.1 * torch.randn(8, 1)  # (8, 1)
            yield from zip(x.chunk(grad_accum), y.chunk(grad_accum))

    def loss(models, batch, step):
        x, y = batch
        err = torch.nn.functional.mse_loss(models["linear"](x), y)
        return err * float("nan") if step + 1 in poison else err, {"mse": err.item()}

    return loop.Job("toy", {"linear": model}, opt, sched, batches, loss, steps,
                    Checkpoints(root / "checkpoints", keep=10), every, root / "toy_log.jsonl",
                    ema={"linear": loop.EMA(model, 0.9)}, grad_accum=grad_accum, **kw)


def _train(root: Path, steps: int, resume: str | None = None, **kw) -> loop.Job:
    acc = loop.accelerator("no", root)
    job = _toy(root, steps, **kw)
    loop.train(acc, job, loop.resume(acc, job, resume))
    return job


def _log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "toy_log.jsonl").read_text().splitlines()]


def _same(a: loop.Job, b: loop.Job) -> bool:
    pairs = [(a.models["linear"], b.models["linear"]), (a.ema["linear"].shadow, b.ema["linear"].shadow)]
    return all(torch.equal(p, q) for m, n in pairs for p, q in zip(m.parameters(), n.parameters()))


def test_a_resumed_run_ends_with_the_weights_and_average_of_a_straight_one(tmp_path):
    straight = _train(tmp_path / "straight", 6)
    _train(tmp_path / "split", 3)
    resumed = _train(tmp_path / "split", 6, resume="latest")
    assert _same(straight, resumed)
    assert [r["step"] for r in _log(tmp_path / "split") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in Checkpoints(tmp_path / "split" / "checkpoints").all()] == [2, 3, 4, 6]


def test_accumulated_half_batches_make_the_step_of_the_whole_batch(tmp_path):
    whole, halves = _train(tmp_path / "whole", 4), _train(tmp_path / "halves", 4, grad_accum=2)
    for p, q in zip(whole.models["linear"].parameters(), halves.models["linear"].parameters()):
        torch.testing.assert_close(p, q)
    assert [r["loss"] for r in _log(tmp_path / "whole")] == pytest.approx([r["loss"] for r in _log(tmp_path / "halves")])


def test_a_non_finite_step_is_skipped_and_too_many_in_a_row_stop_the_run(tmp_path):
    job = _train(tmp_path / "once", 4, poison={2})
    assert [r["skipped"] for r in _log(tmp_path / "once") if "loss" in r] == [False, True, False, False]
    assert all(torch.isfinite(p).all() for p in job.models["linear"].parameters())
    with pytest.raises(loop.TrainingError, match=r"2 non-finite steps in a row at step 4.*\(step 2\)"):
        _train(tmp_path / "always", 8, poison=set(range(3, 9)), max_bad_steps=2)
    assert [s for s, _ in Checkpoints(tmp_path / "always" / "checkpoints").all()] == [2]


def test_the_time_budget_stops_the_run_at_a_checkpoint(tmp_path):
    with pytest.raises(loop.OutOfTime, match=r"toy: max_minutes \(1e-09\) ran out at step 2") as stop:
        _train(tmp_path, 6, budget=loop.TimeBudget(1e-9))
    assert stop.value.step == 2
    assert [s for s, _ in Checkpoints(tmp_path / "checkpoints").all()] == [2]
    assert (tmp_path / "toy_loss.png").is_file()  # drawn when a run stops, too


def test_ctrl_c_saves_the_step_it_reached_and_puts_the_handlers_back(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    job = _toy(tmp_path, 10, every=100)
    forward = job.loss

    def interrupted(models, batch, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # mid-step: the loop saves the last whole step, 2
        return forward(models, batch, step)

    job.loss = interrupted
    acc = loop.accelerator("no", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        loop.train(acc, job, 0)
    assert [s for s, _ in Checkpoints(tmp_path / "checkpoints").all()] == [2]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_signal_during_the_update_is_raised_once_the_step_is_whole():
    """Raised between the optimizer's update and the step count, Ctrl-C saved step N's name on step N+1's
    weights (the LoRA trainer's ctrl-c resume test failed once in CI); the handler holds it until the step is
    whole."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with loop._whole_step():
            loop._on_signal(signal.SIGINT, None)
            done.append("update and count")
    assert done == ["update and count"]
    with pytest.raises(KeyboardInterrupt):  # between steps (data, forward, backward): at once
        loop._on_signal(signal.SIGINT, None)
    with loop._whole_step():  # nothing pending is left over
        pass


def test_warmup_then_cosine_settles_at_the_floor():
    f = loop.warmup_cosine(warmup_steps=10, steps=110, floor=0.05)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.525) and f(110) == pytest.approx(0.05) and f(500) == pytest.approx(0.05)


def test_a_resumed_optimizers_moments_follow_the_weights_to_their_device():
    """Restored before accelerate moves the weights (to a GPU), Adam's moments must move with them."""
    w = torch.nn.Parameter(torch.ones(3, device="meta"))  # where `prepare` put the weight (a stand-in device)
    opt = torch.optim.AdamW([w])
    opt.state[w] = {"step": torch.tensor(5.0), "exp_avg": torch.ones(3), "exp_avg_sq": torch.ones(3)}  # restored
    loop._state_beside_weights(opt)
    state = opt.state[w]
    assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
    assert state["step"].device.type == "cpu"  # Adam keeps its step count on the CPU


def test_metrics_also_go_to_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, 4)
    (run,) = (tmp_path / "tensorboard").iterdir()
    assert run.name == "toy"
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"loss", "mse", "lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- the loss curve


def test_the_loss_curve_draws_each_step_once_and_skips_what_is_not_a_loss(tmp_path):
    log = tmp_path / "unet_log.jsonl"
    records = [{"step": s, "loss": 2.0 / s} for s in range(1, 41)] + [{"step": 40, "val_psnr": 20.0}]
    records += [{"step": 30, "loss": 0.01}]  # logged again by a run resumed from step 29: the last one counts
    log.write_text("\n".join(map(json.dumps, records)) + '\n{"step": 41, "lo')  # a line cut short by a kill
    png = loop.loss_curve(log, tmp_path / "unet_loss.png", "unet")
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape == (450, 800, 3)
    curve = (abs(image - [25, 70, 160]).sum(axis=2) < 30)  # the moving average's colour
    assert curve.sum() > 200
    assert loop.loss_curve(tmp_path / "none.jsonl", tmp_path / "none.png", "none") is None
    log.write_text(json.dumps({"step": 1, "mse": 0.5}) + "\n")
    assert loop.loss_curve(log, tmp_path / "no_loss.png", "unet") is None and not (tmp_path / "no_loss.png").exists()


def test_a_run_ends_with_its_loss_curve_beside_its_log(tmp_path):
    _train(tmp_path, 4)
    assert Image.open(tmp_path / "toy_loss.png").size == (800, 450)


# --------------------------------------------------------------------------- what each trainer gained


def _vae_log(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "vae_log.jsonl").read_text().splitlines()]


def test_a_demo_stage_skips_a_non_finite_step_and_stops_after_too_many(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from t2i.train.demo import vae_stages

    calls, original = {"n": 0}, AutoencoderKL.decode

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:  # the stage's steps, not its validation
            calls["n"] += 1
            if calls["n"] in poison:
                out.sample = out.sample * float("nan")
        return out

    monkeypatch.setattr(AutoencoderKL, "decode", poisoned)
    monkeypatch.setattr(vae_stages, "vae_psnr", lambda vae: 0.0)  # the held-out PSNR is not what this is about
    poison = {2}
    root = tmp_path / "once"
    demo.run(str(demo.CONFIGS / "tiny.toml"), "vae", "latest", {"output_dir": str(root)})
    assert [r["skipped"] for r in _vae_log(root) if "loss" in r] == [False, True, False, False]
    weights = load_file(str(Checkpoints(root / "vae_checkpoints").latest() / "vae.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (root / "vae" / "config.json").is_file()

    calls["n"], poison = 0, set(range(3, 100))
    root = tmp_path / "always"
    with pytest.raises(loop.TrainingError, match=r"2 non-finite steps in a row at step 4"):
        demo.run(str(demo.CONFIGS / "tiny.toml"), "vae", "latest", {"output_dir": str(root), "max_bad_steps": 2})
    assert [s for s, _ in Checkpoints(root / "vae_checkpoints").all()] == [2]
    assert not (root / "vae").exists()


def test_the_lora_trainer_stops_at_a_checkpoint_when_its_time_is_up_and_goes_on(tiny_sd, data, tmp_path, caplog):
    caplog.set_level("INFO", logger="t2i.train")
    out = tmp_path / "out"
    cfg = lora_cfg(tiny_sd, data, out, steps=4, checkpoint_every=2)
    assert lora.run(None, {**cfg, "max_minutes": 1e-9}) is None
    assert "lora: max_minutes (1e-09) ran out at step 2" in caplog.text and "--resume latest" in caplog.text
    assert [s for s, _ in Checkpoints(out / "checkpoints").all()] == [2]
    assert not (out / "lora.safetensors").exists()
    assert lora.run(None, cfg, resume="latest") == out / "lora.safetensors"
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps == [1, 2, 3, 4]
    assert Image.open(out / "train_loss.png").size == (800, 450)


def test_max_minutes_must_not_be_negative(tiny_sd, data, tmp_path, no_model_load):
    with pytest.raises(ValueError, match="--max-minutes must be >= 0"):
        lora.run(None, lora_cfg(tiny_sd, data, tmp_path / "o", max_minutes=-1.0))
