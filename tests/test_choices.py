"""The torch-free names the CLI offers are the ones the code behind them takes."""

from __future__ import annotations

from t2i import choices, devices, speed
from t2i.bench import core, random_models


def test_devices_and_dtypes_are_what_devices_resolves():
    assert set(choices.DTYPES) == {"auto", *devices.TORCH_DTYPES}
    for name in ("auto", "cpu"):
        assert name in choices.DEVICES
        devices.resolve_device(name)


def test_speed_and_bench_names_are_what_speed_and_bench_take():
    assert choices.SPEED_OPTIONS == tuple(speed.OPTION_NAMES)
    assert list(choices.BENCH_OPTIONS) == [n for n in speed.SpeedOptions().names() if n != "sdpa"]
    assert choices.BENCH_ARCHS == tuple(random_models.ARCHS)
    assert core.PROMPT == choices.BENCH_PROMPT
