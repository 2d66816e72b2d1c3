"""`--speed auto`, the default: what it picks is a function of the device's capabilities, recorded and replayed.

The suite runs as on a CPU without bf16 instructions (tests/conftest.py sets T2I_CPU_BF16=0), where `auto` is
fp32 with batched UNet calls. The tests here turn the capability on (`cpu_bf16`): bf16 then runs emulated on
any CPU, slowly, so on the tiny models only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import pixels
from t2i import devices, speed
from t2i.errors import UsageError
from t2i.speed import SpeedOptions, auto_choice

ARGS = dict(steps=3, seed=11, sampler="euler", progress=False)
BF16_TOL = 12  # an 8-bit mantissa through every layer of the tiny model (see test_speed.BF16_TOL)
AUTO_BF16 = ["batched", "bf16_weights", "bf16_vae"]


def weights(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def test_auto_choice_is_a_function_of_the_capabilities():
    fp32, bf16 = torch.float32, torch.bfloat16
    assert auto_choice("cpu", fp32, cpu_bf16=True) | {} == {"batched": True, "sdpa": True, "bf16": False,
                                                             "bf16_weights": True, "bf16_vae": True}
    assert auto_choice("cpu", fp32, cpu_bf16=False)["bf16_weights"] is False  # emulated bf16 is slower: fp32
    assert auto_choice("cpu", fp32, cpu_bf16=True, model_allows_bf16=False)["bf16_weights"] is False
    assert auto_choice("cpu", bf16, cpu_bf16=True)["bf16_weights"] is False  # a bf16 pipeline is bf16 already
    assert auto_choice("cuda", torch.float16, cpu_bf16=True)["bf16_weights"] is False  # --dtype auto: half already
    assert all(auto_choice(d, fp32, c)["batched"] for d in ("cpu", "cuda", "mps") for c in (True, False))


def test_the_capability_reads_the_cpu_flags_unless_pinned(monkeypatch):
    monkeypatch.setenv("T2I_CPU_BF16", "1")
    assert devices.cpu_has_bf16() is True
    monkeypatch.setenv("T2I_CPU_BF16", "0")
    assert devices.cpu_has_bf16() is False
    monkeypatch.delenv("T2I_CPU_BF16")
    flags = set(open("/proc/cpuinfo").read().split())
    assert devices.cpu_has_bf16() is bool({"amx_bf16", "avx512_bf16"} & flags)


def test_auto_and_exact_parse_alone():
    assert SpeedOptions.parse("auto") == SpeedOptions()
    assert SpeedOptions.parse("exact") == SpeedOptions.off() and SpeedOptions.off().exact
    assert not SpeedOptions().exact  # auto batches
    with pytest.raises(UsageError, match="stands alone"):
        SpeedOptions.parse("auto,cache3")


def test_auto_without_bf16_instructions_is_fp32_batched_and_a_single_image_is_the_exact_one(sd_pipe):
    assert sd_pipe.speed == "auto"
    auto = sd_pipe("a red circle", **ARGS)
    sd_pipe.speed = "exact"
    try:
        exact = sd_pipe("a red circle", **ARGS)
    finally:
        sd_pipe.speed = "auto"
    assert auto.settings[0].speed == ["batched"] and exact.settings[0].speed == []
    assert auto.settings[0].dtype == "fp32"
    assert np.array_equal(pixels(auto.images[0]), pixels(exact.images[0]))


def test_auto_on_a_bf16_cpu_runs_unet_and_text_encoder_on_bf16_weights_and_records_it(sd_pipe, cpu_bf16):
    unet, encoder = sd_pipe.pipe.unet, sd_pipe.pipe.text_encoder
    seen = []
    hooks = [unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(("unet", m.weight.dtype, a[0].dtype))),
             encoder.get_input_embeddings().register_forward_pre_hook(
                 lambda m, a: seen.append(("text", m.weight.dtype, None)))]
    before_unet, before_text = weights(unet), weights(encoder)
    try:
        result = sd_pipe("a red circle", batch=2, **ARGS)
    finally:
        for h in hooks:
            h.remove()
    assert ("unet", torch.bfloat16, torch.bfloat16) in seen and ("text", torch.bfloat16, None) in seen
    assert all(dtype == torch.bfloat16 for _, dtype, _ in seen)
    assert [s.speed for s in result.settings] == [AUTO_BF16, AUTO_BF16]
    assert result.settings[0].dtype == "fp32"  # the pipeline's dtype: the fp32 weights are kept, as loaded
    # outside the call the modules are exactly as loaded
    assert same(weights(unet), before_unet) and same(weights(encoder), before_text)
    assert "forward" not in unet.__dict__ and sd_pipe.decoder is None and sd_pipe.speed_on is None


def test_exact_gives_todays_pixels_before_and_after_auto_in_bf16(sd_pipe, cpu_bf16):
    sd_pipe.speed = "exact"
    try:
        before = sd_pipe("two blue squares", batch=2, **ARGS).images
        sd_pipe.speed = "auto"
        fast = sd_pipe("two blue squares", batch=2, **ARGS).images
        sd_pipe.speed = "exact"
        after = sd_pipe("two blue squares", batch=2, **ARGS).images
        single = sd_pipe("two blue squares", **ARGS | {"seed": ARGS["seed"] + 1}).images[0]
    finally:
        sd_pipe.speed = "auto"
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(before, after))
    assert np.array_equal(pixels(after[1]), pixels(single))  # exact: a batch equals its single runs
    diffs = [np.abs(pixels(f) - pixels(b)).max() for f, b in zip(fast, before)]
    assert 0 < max(diffs) <= BF16_TOL  # bf16 changes the last bits, not the picture


def test_auto_in_bf16_is_the_same_image_for_the_same_seed(sd_pipe, cpu_bf16):
    a = sd_pipe("a green star", **ARGS).images[0]
    b = sd_pipe("a green star", **ARGS).images[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_a_model_can_keep_auto_in_fp32(sd_copy, cpu_bf16):
    from t2i.pipelines import Text2Image

    (sd_copy / "t2i.json").write_text('{"auto_bf16": false}')
    pipe = Text2Image.from_pretrained(str(sd_copy), device="cpu")
    assert pipe("a red circle", **ARGS).settings[0].speed == ["batched"]


def test_generate_records_auto_bf16_and_reproduce_replays_it_on_a_cpu_without_bf16(run_cli, tiny_sd, tmp_path,
                                                                                   cpu_bf16, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 3, "--batch", 2,
                           "--out", out, "-q")
    assert code == 0, err
    from t2i import metadata

    png = sorted(out.glob("*.png"))[1]
    assert metadata.read(png)[1].speed == AUTO_BF16
    monkeypatch.setenv("T2I_CPU_BF16", "0")  # replayed from the record, not chosen again
    code, out_text, err = run_cli("reproduce", png, "-q")
    assert code == 0 and "bit for bit" in out_text, out_text + err


def test_generate_speed_exact_is_recorded_as_the_plain_path(run_cli, tiny_sd, tmp_path, cpu_bf16):
    from t2i import metadata

    code, _, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 3,
                           "--speed", "exact", "--out", tmp_path / "o", "-q")
    assert code == 0, err
    assert metadata.read(next((tmp_path / "o").glob("*.png")))[1].speed == []


def test_a_speed_mode_combined_with_options_is_refused_before_loading(run_cli, tiny_sd, tmp_path, no_model_load):
    code, _, err = run_cli("generate", "a red circle", "--model", tiny_sd, "--speed", "auto,cache3",
                           "--out", tmp_path / "o")
    assert code == 2 and "stands alone" in err and len(err.strip().splitlines()) == 1


def test_the_bf16_vae_decodes_again_with_the_fp32_weights_on_nan(sd_pipe):
    from t2i import guards

    vae = sd_pipe.pipe.vae
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(latents).sample
    real = vae.decode
    calls = []

    def overflowing(z, *args, **kwargs):  # what an fp16/bf16 overflow looks like: NaN out of a low precision
        calls.append(vae.dtype)
        out = real(z, *args, **kwargs)
        if vae.dtype == torch.bfloat16:
            out.sample = torch.full_like(out.sample, float("nan"))
        return out

    before = weights(vae)
    vae.decode = overflowing
    try:
        got = guards.decode_latents(speed.Bf16Decoder(vae), latents)
    finally:
        del vae.decode
    assert calls == [torch.bfloat16, torch.float32]  # bf16 first, then the retry
    assert torch.equal(got, want)  # with the original fp32 weights, not bf16-rounded ones
    assert same(weights(vae), before)


def test_the_bf16_weight_copies_are_made_once_and_again_when_the_weights_change(sd_pipe):
    from t2i.speed import bf16

    unet = sd_pipe.pipe.unet
    with bf16.swapped(unet):
        first = unet.conv_in.weight.data_ptr()
    with bf16.swapped(unet):
        assert unet.conv_in.weight.data_ptr() == first  # cached: a loop of calls casts once
    kept = unet.conv_in.weight.data.clone()
    try:
        with torch.no_grad():
            unet.conv_in.weight.add_(1.0)  # e.g. an optimizer step
        with bf16.swapped(unet):
            assert torch.equal(unet.conv_in.weight.data.float(), (kept + 1.0).to(torch.bfloat16).float())
    finally:
        with torch.no_grad():
            unet.conv_in.weight.copy_(kept)
