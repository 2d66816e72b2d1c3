"""Text2Image: the Python API, every sampler, seeds and batches, long prompts, the NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import pixels
from t2i import guards, prompts
from t2i.errors import NumericalError, UsageError
from t2i.pipelines import Result, Text2Image
from t2i.samplers import SAMPLERS


def _same(a: Result, b: Result) -> bool:
    return len(a.images) == len(b.images) and all(
        np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images)
    )


# --------------------------------------------------------------------------- API


def test_call_returns_images_and_their_settings(sd_pipe, tiny_sd):
    result = sd_pipe("a red circle", steps=2, seed=3, sampler="euler", width=40, height=32, progress=False)
    assert isinstance(result, Result)
    (image, s), = list(result)
    assert image.size == (40, 32)
    assert (s.prompt, s.seed, s.steps, s.sampler, s.width, s.height) == ("a red circle", 3, 2, "euler", 40, 32)
    assert (s.model, s.arch, s.dtype, s.device) == (str(tiny_sd), "sd1", "fp32", "cpu")
    assert s.model_hash == sd_pipe.model.hash and len(s.model_hash) == 10


def test_pipeline_is_reusable_without_reloading(sd_pipe, monkeypatch):
    def no_reload(*args, **kwargs):
        raise AssertionError("reloaded")

    monkeypatch.setattr(Text2Image, "from_pretrained", no_reload)
    unet = sd_pipe.pipe.unet
    images = [sd_pipe(p, steps=2, seed=1, progress=False).images[0] for p in ("a red circle", "a blue star")]
    assert sd_pipe.pipe.unet is unet
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    assert sd_pipe.to("cpu") is sd_pipe
    assert sd_pipe.device.type == "cpu" and sd_pipe.dtype == torch.float32


def test_api_errors_are_specific_exceptions(sd_pipe):
    with pytest.raises(UsageError, match="multiple of 2"):  # the tiny VAE downsamples by 2
        sd_pipe("a", steps=1, width=33, progress=False)
    with pytest.raises(UsageError, match="runs past"):
        sd_pipe("a", steps=1, seed=2**64 - 1, batch=2, progress=False)
    with pytest.raises(UsageError, match="valid: .*euler-a"):
        sd_pipe("a", steps=1, sampler="nope", progress=False)


# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs(sd_pipe, name):
    result = sd_pipe("a green triangle", steps=3, seed=2, sampler=name, progress=False)
    # decode_latents raises NumericalError on NaN/inf latents, so getting here means they were finite
    sampler = SAMPLERS[name]
    assert isinstance(sd_pipe.pipe.scheduler, sampler.scheduler)
    for key, value in sampler.options.items():
        assert sd_pipe.pipe.scheduler.config[key] == value
    image = pixels(result.images[0])
    assert image.std() > 0  # not a constant (e.g. black) image
    assert result.settings[0].sampler == name


def test_a1111_names_select_the_same_sampler(sd_pipe):
    a = sd_pipe("a", steps=2, seed=1, sampler="DPM++ 2M Karras", progress=False)
    b = sd_pipe("a", steps=2, seed=1, sampler="dpm++2m-karras", progress=False)
    c = sd_pipe("a", steps=2, seed=1, sampler="euler", progress=False)
    assert (a.settings[0].sampler, a.settings[0].scheduler) == ("dpm++2m", "karras")
    assert _same(a, b) and not _same(a, c)


# --------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("sampler", ["euler", "euler-a", "dpm++sde-karras"])
def test_same_seed_same_pixels_other_seed_other_pixels(sd_pipe, sampler):
    run = lambda seed: sd_pipe("a red circle", steps=2, seed=seed, sampler=sampler, progress=False)  # noqa: E731
    assert _same(run(7), run(7))
    assert not _same(run(7), run(8))


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler-a", "dpm++sde-karras"])
def test_batch_equals_single_runs(request, arch, sampler):
    pipe = request.getfixturevalue(f"{arch}_pipe")
    pipe.speed = "exact"  # auto batches the UNet: images equal their single runs only to within rounding
    try:
        batch = pipe("a blue square", steps=2, seed=20, sampler=sampler, batch=3, progress=False)
        singles = [pipe("a blue square", steps=2, seed=20 + i, sampler=sampler, progress=False) for i in range(3)]
    finally:
        pipe.speed = "auto"
    assert [s.seed for s in batch.settings] == [20, 21, 22]
    assert [s.batch_index for s in batch.settings] == [0, 1, 2]
    for i, (image, single) in enumerate(zip(batch.images, singles)):
        assert np.array_equal(pixels(image), pixels(single.images[0])), f"image {i} differs from seed {20 + i}"
    assert not np.array_equal(pixels(batch.images[0]), pixels(batch.images[1]))


def test_initial_noise_is_drawn_on_the_cpu_from_the_seed(sd_pipe):
    settings = sd_pipe._settings("a", None, 2, None, None, 123, None, None, 2, [])
    latents, generators = sd_pipe._noise(settings)
    assert latents.shape == (2, 4, 16, 16)
    for i, seed in enumerate((123, 124)):
        expected = torch.randn((1, 4, 16, 16), generator=torch.Generator("cpu").manual_seed(seed))
        assert torch.equal(latents[i : i + 1], expected)
    assert all(g.device.type == "cpu" for g in generators)


# --------------------------------------------------------------------------- long prompts


def test_long_prompts_are_chunked_not_cut(sd_pipe, tokenizer):
    words = "red circle blue square green star above small big triangle".split()
    text = lambda n: " ".join(words[i % len(words)] for i in range(n))  # noqa: E731 - one token per word
    p = sd_pipe.pipe
    for n, length in ((75, 77), (76, 154), (150, 154), (151, 231)):
        assert prompts.count_tokens(tokenizer, text(n)) == n
        assert prompts.encode_sd(p.tokenizer, p.text_encoder, text(n)).embeds.shape == (1, length, 32)
    base, longer = text(80), text(80) + " green star above"
    a = sd_pipe(base, steps=2, seed=1, progress=False)
    b = sd_pipe(longer, steps=2, seed=1, progress=False)
    assert not _same(a, b)  # words past token 75 reach the model


def test_long_prompts_on_sdxl(sdxl_pipe):
    p = sdxl_pipe.pipe
    enc = prompts.encode_sdxl([p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2], "red " * 100)
    assert enc.embeds.shape == (1, 154, 64) and enc.pooled.shape == (1, 32)
    a = sdxl_pipe("red " * 80, steps=2, seed=1, progress=False)
    b = sdxl_pipe("red " * 80 + "blue star", steps=2, seed=1, progress=False)
    assert not _same(a, b)


# --------------------------------------------------------------------------- NaN guard


@pytest.fixture(scope="module")
def bf16_pipe(tiny_sd):
    return Text2Image.from_pretrained(str(tiny_sd), device="cpu", dtype="bf16")


def _nan_below_fp32(vae, monkeypatch):
    """Make the VAE overflow (decode to NaN) unless it runs in fp32, like SD's VAE in fp16."""
    decode = vae.decode
    calls = []

    def overflowing(z, *args, **kwargs):
        calls.append(vae.dtype)
        out = decode(z, *args, **kwargs)
        if vae.dtype != torch.float32:
            out.sample = torch.full_like(out.sample, float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", overflowing)
    return calls


def _set_force_upcast(vae, value: bool, monkeypatch):
    from diffusers.configuration_utils import FrozenDict

    monkeypatch.setattr(vae, "_internal_dict", FrozenDict({**vae.config, "force_upcast": value}))


def test_vae_overflow_is_retried_in_fp32(bf16_pipe, monkeypatch, caplog):
    vae = bf16_pipe.pipe.vae
    _set_force_upcast(vae, False, monkeypatch)  # try the model's dtype first, as for fp16-fixed VAEs
    calls = _nan_below_fp32(vae, monkeypatch)
    result = bf16_pipe("a red circle", steps=2, seed=1, progress=False)
    assert calls == [torch.bfloat16, torch.float32]
    image = pixels(result.images[0])
    assert image.std() > 0 and image.max() > 0  # not black
    assert [r.getMessage() for r in caplog.records] == ["the VAE overflowed in bfloat16; decoding again in fp32"]
    assert vae.dtype == torch.bfloat16  # moved back after the retry


def test_force_upcast_vae_decodes_in_fp32_directly_in_fp16_only(bf16_pipe, monkeypatch, caplog):
    """force_upcast is for fp16's range, which SD's VAE overflows; bf16 has fp32's range, so a bf16 VAE decodes in
    bf16 first (as stock diffusers does) and the NaN guard still retries in fp32."""
    vae = bf16_pipe.pipe.vae
    _set_force_upcast(vae, True, monkeypatch)
    calls = _nan_below_fp32(vae, monkeypatch)
    result = bf16_pipe("a red circle", steps=2, seed=1, progress=False)
    assert calls == [torch.bfloat16, torch.float32]
    assert pixels(result.images[0]).std() > 0

    class Fp16Vae:  # what decode_latents sees of an fp16 VAE (fp16 does not run on the CPU)
        config = type("Config", (), {"force_upcast": True})()
        dtype, seen = torch.float16, []

        def to(self, dtype):
            self.dtype = dtype

        def decode(self, z):
            self.seen.append((self.dtype, z.dtype))
            return type("Out", (), {"sample": z[:, :3].float()})()

    fp16 = Fp16Vae()
    guards.decode_latents(fp16, torch.zeros(1, 4, 2, 2))
    assert fp16.seen == [(torch.float32, torch.float32)] and fp16.dtype == torch.float16


def test_nan_latents_raise_numerical_error(sd_pipe):
    latents = torch.full((1, 4, 16, 16), float("nan"))
    with pytest.raises(NumericalError, match="NaN"):
        guards.decode_latents(sd_pipe.pipe.vae, latents)

    def nan_out(module, args, output):
        return (torch.full_like(output[0], float("nan")),) + tuple(output[1:])

    handle = sd_pipe.pipe.unet.register_forward_hook(nan_out)
    try:
        with pytest.raises(NumericalError):
            sd_pipe("a", steps=2, seed=1, sampler="euler", progress=False)
    finally:
        handle.remove()


def test_vae_broken_even_in_fp32_raises(sd_pipe, monkeypatch):
    vae = sd_pipe.pipe.vae
    decode = vae.decode

    def broken(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        out.sample = torch.full_like(out.sample, float("inf"))
        return out

    monkeypatch.setattr(vae, "decode", broken)
    with pytest.raises(NumericalError, match="fp32"):
        sd_pipe("a", steps=1, seed=1, progress=False)
