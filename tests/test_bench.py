"""`t2i bench` mechanics on the tiny model (no timing assertions: the machine decides those)."""

from __future__ import annotations

import torch

from helpers import one_line
from t2i import bench


def test_bench_rows_and_outputs_against_stock(sd_pipe):
    rows = bench.run(sd_pipe, steps=3, repeats=1, options=["batched", "channels_last"])
    assert [r.name for r in rows] == ["stock diffusers", "t2i", "t2i + batched", "t2i + channels_last",
                                      "t2i + batched + channels_last"]
    assert rows[1].max_diff == 0  # t2i's own path makes stock diffusers' image exactly (same noise, same steps)
    assert all(r.max_diff <= 2 for r in rows)  # the speed options stay within 2/255 of it
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
