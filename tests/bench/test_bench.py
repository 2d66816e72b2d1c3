"""`t2i bench` mechanics on the tiny model (no timing assertions: the machine decides those)."""

from __future__ import annotations

import pytest
import torch

from helpers import one_line
from t2i import bench, speed


def test_bench_rows_and_outputs_against_stock(sd_pipe):
    rows = bench.bench(sd_pipe, steps=3, repeats=1, options=["batched", "channels_last"]).rows
    assert [r.name for r in rows] == ["stock diffusers", "stock diffusers bf16", "t2i", "t2i auto (batched)",
                                      "t2i + batched", "t2i + channels_last", "t2i + batched + channels_last"]
    assert [r.dtype for r in rows] == ["fp32", "bf16", "fp32", "fp32", "fp32", "fp32", "fp32"]
    assert rows[2].max_diff == 0  # t2i's own path makes stock diffusers' image exactly (same noise, same steps)
    assert rows[1].max_diff > 0  # stock's bf16 flag changes the image
    assert all(r.max_diff <= 2 for r in rows if r.dtype == "fp32")  # the speed options stay within 2/255 of it
    assert sd_pipe.pipe.unet.dtype == torch.float32  # stock's bf16 row ran on copies
    assert all(len(r.call_s) == 1 and r.call > 0 and r.step > 0 for r in rows)
    assert sd_pipe.exact_batch is True  # switches are undone after each run
    conv = sd_pipe.pipe.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)
    text = bench.table(rows)
    assert "stock diffusers" in text and "1.00x" in text


def test_bench_cli_prints_the_table_and_refuses_unknown_options(run_cli, tiny_sd, no_model_load):
    code, _, stderr = run_cli("bench", "--model", tiny_sd, "--options", "turbo")
    assert code == 2 and "unknown speed option 'turbo'" in one_line(stderr)


def test_bench_cli_runs(run_cli, tiny_sd):
    code, stdout, stderr = run_cli("bench", "--model", tiny_sd, "--steps", 2, "--repeats", 1, "--options", "batched")
    assert code == 0, stderr
    assert "stock diffusers" in stdout and "t2i + batched" in stdout


def test_feature_cache_runs_the_deep_blocks_only_every_nth_step_and_undoes_itself(sd_pipe):
    calls = []
    hook = sd_pipe.pipe.unet.mid_block.resnets[0].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        plain = sd_pipe("x", steps=6, seed=3, sampler="euler", progress=False).images[0]
        calls.clear()
        with speed.feature_cache(sd_pipe, 3):
            assert sd_pipe.exact_batch is False
            cached = sd_pipe("x", steps=6, seed=3, sampler="euler", progress=False).images[0]
            assert len(calls) == 2  # steps 1 and 4 of 6 run the whole UNet
            sd_pipe("x", steps=6, seed=3, sampler="euler", progress=False)
            assert len(calls) == 4  # a new call starts with a full step, never with the last call's features
        after = sd_pipe("x", steps=6, seed=3, sampler="euler", progress=False).images[0]
    finally:
        hook.remove()
    assert sd_pipe.exact_batch is True
    assert after.tobytes() == plain.tobytes()  # leaving the block restores the plain UNet exactly
    assert cached.tobytes() != plain.tobytes()


def test_bench_auto_row_on_a_bf16_cpu_is_bf16_and_each_row_is_a_share_of_its_own_dtypes_peak(sd_pipe, cpu_bf16,
                                                                                              monkeypatch):
    from t2i.bench import core

    real = core.matmul_peak
    dtypes = []
    monkeypatch.setattr(core, "matmul_peak", lambda device, dtype=torch.float32, **_: dtypes.append(dtype) or real(
        device, n=128, repeats=1, dtype=dtype))  # small: bf16 is emulated, slowly, on most CPUs
    report = bench.bench(sd_pipe, steps=2, repeats=1, options=[], flops=True)
    assert dtypes == [torch.float32, torch.bfloat16]
    rows = {r.name: r for r in report.rows}
    auto = rows["t2i auto (batched, bf16_weights, bf16_vae)"]
    assert (auto.dtype, rows["stock diffusers bf16"].dtype, rows["t2i"].dtype) == ("bf16", "bf16", "fp32")
    info = report.info
    assert info["matmul_gflops"] > 0 and info["matmul_gflops_bf16"] > 0
    for r in (auto, rows["t2i"]):
        peak = info["matmul_gflops_bf16" if r.dtype == "bf16" else "matmul_gflops"]
        assert report._share(r) == pytest.approx(info["unet_gflop"] / r.step / peak)
    text = bench.table(report.rows, info)
    assert "bf16" in text.splitlines()[-1] and "of peak" in text.splitlines()[0]
    assert all(isinstance(row["peak_share"], float) for row in report.to_json()["rows"])
