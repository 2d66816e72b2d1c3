"""Issue 7's bad input and numerical faults, and fuzzing of the prompt parser and the PNG metadata reader.

Each test tries to break a promise of the README's "Promises" list: odd prompts work
and round-trip through the metadata, impossible jobs are refused before compute,
NaN/inf stops a run at the step it appears, a LoRA holding NaN/inf never loads, and
the parsers answer arbitrary input with nothing but their documented errors.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from helpers import one_line
from t2i import guards, metadata, prompts
from t2i.errors import ModelLoadError, NumericalError, UsageError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- prompts that must work


@pytest.mark.parametrize("prompt", [
    "",  # unconditional: allowed
    "café ☕ 日本語のプロンプト 🐱🚀 — Ünïcödé",
    "(weird:1.5) [[nested]] \\(escaped\\) BREAK after",
    "a red circle, " * 770,  # 10,010 characters: 3,080 tokens in 42 chunks, not cut
])
def test_odd_prompts_generate_and_round_trip_through_the_metadata(run_cli, tiny_sd, tmp_path, prompt):
    code, stdout, stderr = run_cli("generate", prompt, "--model", tiny_sd, "--steps", 1, "--seed", 4,
                                   "--out", tmp_path, "-q")
    assert code == 0, stderr
    text, s = metadata.read(stdout.strip())
    assert s.prompt == prompt
    assert metadata.parse_a1111(text)["Prompt"] == prompt.strip()


def test_a_10000_character_prompt_reaches_the_model_whole(sd_pipe):
    long = "a red circle, " * 770
    embeds = prompts.encode_sd(sd_pipe.pipe.tokenizer, sd_pipe.pipe.text_encoder, long).embeds
    assert embeds.shape[1] == 77 * -(-prompts.count_tokens(sd_pipe.pipe.tokenizer, long) // 75)


# --------------------------------------------------------------------------- impossible jobs, refused early


def test_a_batch_too_large_for_memory_is_refused_before_any_compute(sd_pipe, monkeypatch):
    calls = []
    hook = sd_pipe.pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    monkeypatch.setattr(guards, "available_memory", lambda device: 64 * 2**20)  # a machine with 64 MiB free
    try:
        with pytest.raises(UsageError, match=r"needs about .* GiB of memory on cpu but 0.1 GiB are free; use a"):
            sd_pipe("x", batch=20000, steps=1, progress=False)
        sd_pipe("x", batch=2, steps=1, progress=False)  # what fits still runs
    finally:
        hook.remove()
    assert len(calls) == 1  # only the job that fits reached the UNet (one call: 2 images, cond+uncond rows)


def test_the_memory_estimate_grows_with_batch_and_size(sd_pipe):
    one = sd_pipe.memory_estimate(1, 32, 32)
    assert sd_pipe.memory_estimate(101, 32, 32) - one == 100 * (sd_pipe.memory_estimate(2, 32, 32) - one) > 0
    assert sd_pipe.memory_estimate(1, 256, 256) == 64 * one  # every term scales with the pixel count
    assert guards.available_memory(torch.device("cpu")) > 0  # read from /proc/meminfo (and cgroups) here


# --------------------------------------------------------------------------- NaN / inf


def _nan_from_step(unet, step: int):
    """Make the UNet's output NaN from its `step`-th call on; returns (hook handle, call counter)."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) >= step:
            return (torch.full_like(output[0], float("nan")),) + tuple(output[1:])
        return output

    return unet.register_forward_hook(hook), calls


def test_nan_from_the_unet_stops_at_the_step_it_appears(sd_pipe):
    handle, calls = _nan_from_step(sd_pipe.pipe.unet, 3)
    try:
        with pytest.raises(NumericalError, match="NaN/inf at step 3 of 8 in fp32"):
            sd_pipe("x", steps=8, seed=1, sampler="euler", progress=False)
    finally:
        handle.remove()
    assert len(calls) == 3  # stopped there, not after all 8 steps


def test_nan_from_the_unet_on_the_cli_is_one_line_and_writes_nothing(run_cli, tiny_sd, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.forward

    def broken(self, sample, *args, **kwargs):
        out = original(self, sample, *args, **kwargs)
        out[0].fill_(float("inf")) if not kwargs.get("return_dict", True) else out.sample.fill_(float("inf"))
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", broken)
    code, stdout, stderr = run_cli("generate", "x", "--model", tiny_sd, "--steps", 4, "--out", tmp_path / "o", "-q")
    assert code == 2 and stdout == ""
    assert "NaN/inf at step 1 of 4" in one_line(stderr)
    assert not list((tmp_path / "o").glob("*.png"))


def test_a_lora_holding_nan_or_inf_is_refused_when_loaded(run_cli, sd_pipe, tiny_sd, lora_file, tmp_path):
    from safetensors.torch import load_file, save_file

    for bad in (float("nan"), float("inf")):
        sd = load_file(str(lora_file))
        key = sorted(sd)[3]
        sd[key][0, 0] = bad
        path = tmp_path / f"broken-{bad}.safetensors"
        save_file(sd, str(path))
        with pytest.raises(ModelLoadError, match=r"contains NaN/inf weights \(1 tensors"):
            sd_pipe("x", steps=1, loras=[path], progress=False)
        code, _, stderr = run_cli("generate", "x", "--model", tiny_sd, "--steps", 1, "--lora", path,
                                  "--out", tmp_path / "o", "-q")
        assert code == 2 and "contains NaN/inf weights" in one_line(stderr)
    clean = sd_pipe("x", steps=1, seed=1, progress=False).images[0]  # nothing of the refused files stuck
    again = sd_pipe("x", steps=1, seed=1, loras=[], progress=False).images[0]
    assert clean.tobytes() == again.tobytes()


# --------------------------------------------------------------------------- fuzzing


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("ab (){}[]:\\,.-0123456789<>|BREAKlor ")), max_size=80)
       | st.text(max_size=80))
def test_the_prompt_parser_takes_any_text(text):
    fragments = prompts.parse(text)
    for f in fragments:
        assert f.weight == -1.0 or (np.isfinite(f.weight) and f.weight >= 0), f
    clean, tagged = prompts.extract_loras(text)
    assert all(isinstance(n, str) and np.isfinite(s) for n, s in tagged)
    prompts.plain_text(text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=400))
def test_tokenizing_any_text_gives_chunks_of_at_most_75_tokens(tokenizer, text):
    chunks = prompts.tokenize(tokenizer, text)
    assert chunks and all(len(c.ids) <= prompts.CHUNK and len(c.ids) == len(c.weights) for c in chunks)


@FUZZ
@given(st.text(max_size=300))
def test_the_a1111_parameters_parser_takes_any_text(text):
    out = metadata.parse_a1111(text)
    assert isinstance(out, dict) and isinstance(out["Prompt"], str)


@FUZZ
@given(prompt=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=60),
       negative=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=30),
       seed=st.integers(0, guards.MAX_SEED))
def test_written_parameters_parse_back(prompt, negative, seed):
    from t2i.settings import Settings

    s = Settings(prompt=prompt, negative_prompt=negative, seed=seed, model_name="m, \"odd\": name")
    fields = metadata.parse_a1111(metadata.a1111_parameters(s))
    assert fields["Seed"] == str(seed) and fields["Model"] == "m, \"odd\": name"
    assert fields.get("Negative prompt", "") == negative.strip()


def _png_with(text: dict[str, str]) -> bytes:
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), chunk=st.text(max_size=200), cut=st.integers(0, 400), flip=st.integers(0, 400))
def test_the_png_metadata_reader_answers_any_file_with_a_usage_error_at_most(tmp_path_factory, data, chunk, cut,
                                                                              flip):
    folder = tmp_path_factory.mktemp("fuzz", numbered=True)
    good = _png_with({"parameters": chunk, "t2i": chunk})
    damaged = bytearray(good[: max(cut, 8)])
    if flip < len(damaged):
        damaged[flip] ^= 0xFF
    valid_json = _png_with({"t2i": json.dumps({"prompt": chunk, "seed": "not a number", "loras": [{}]})})
    for name, content in (("random.png", data), ("damaged.png", bytes(damaged)), ("chunk.png", good),
                          ("json.png", valid_json)):
        path = folder / name
        path.write_bytes(content)
        try:
            metadata.read(path)
        except UsageError as e:
            assert "\n" not in str(e)
