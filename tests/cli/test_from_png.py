"""`t2i generate --from-png`: A1111's "send to txt2img" from an A1111, t2i or ComfyUI image; `--scheduler`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from helpers import pixels
from t2i import metadata

A1111_TEXT = ("a red circle <lora:ink:0.5>\nNegative prompt: blue square\n"
              "Steps: 2, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 5.5, Seed: 77, Size: 32x40, "
              "Model hash: 0123456789, Model: anything-v5, Clip skip: 2, Hires upscale: 2, Hires steps: 4, "
              "Hires upscaler: Latent, Denoising strength: 0.6, Version: v1.10.1")


@pytest.fixture
def a1111_png(tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (32, 40), "white").save(path, pnginfo=info)
    return path


@pytest.fixture
def ink_dir(tmp_path, lora_file):
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(lora_file, folder / "ink.safetensors")
    return folder


def _made(path):
    return metadata.read(path)[1]


def test_a1111_png_settings_run_with_notes_for_the_rest(run_cli, a1111_png, ink_dir, tiny_sd, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "--from-png", a1111_png, "--model", tiny_sd, "--lora-dir", ink_dir,
                                "--out", out, "-q")
    assert code == 0, err
    s = _made(out)
    assert (s.prompt, s.negative_prompt) == ("a red circle <lora:ink:0.5>", "blue square")  # the tag stays
    assert (s.steps, s.sampler, s.scheduler, s.guidance, s.seed, s.width, s.height) == (
        2, "dpm++2m", "exponential", 5.5, 77, 32, 40)
    # A1111's clip skip and hires fix, as recorded: 2 steps at 32x40, then 4 steps at 64x80 from the latents
    assert (s.clip_skip, s.hires_scale, s.hires_steps, s.hires_denoise, s.hires_upscaler) == (2, 2.0, 4, 0.6, "latent")
    assert Image.open(out).size == (64, 80)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert not any("Clip skip" in n or "Hires" in n or "Denoising" in n for n in notes)
    assert any("anything-v5 [0123456789]" in n and "tiny-sd" in n for n in notes)  # another model
    assert all(len(n) < 300 for n in notes) and len(err.splitlines()) == len(notes)


def test_an_upscaler_model_t2i_lacks_is_replaced_by_lanczos_with_a_note(run_cli, tiny_sd, tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT.replace("Hires upscaler: Latent", "Hires upscaler: R-ESRGAN 4x+")
                  .replace(" <lora:ink:0.5>", ""))
    source, out = tmp_path / "esrgan.png", tmp_path / "out.png"
    Image.new("RGB", (32, 40), "white").save(source, pnginfo=info)
    code, _, err = run_cli("generate", "--from-png", source, "--model", tiny_sd, "--out", out, "-q",
                           "--clip-skip", "1")
    assert code == 0, err
    s = _made(out)
    assert (s.hires_upscaler, s.clip_skip) == ("lanczos", 1)  # a flag given wins over the image's Clip skip
    assert any("R-ESRGAN 4x+" in line and "Lanczos" in line for line in err.splitlines() if line.startswith("note: "))


def test_flags_given_win_and_a_new_sampler_takes_its_own_schedule(run_cli, a1111_png, ink_dir, tiny_sd, tmp_path):
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "a blue star", "--from-png", a1111_png, "--model", tiny_sd, "--lora-dir",
                           ink_dir, "--steps", 3, "--seed", 5, "--sampler", "euler", "-W", 32, "-H", 32,
                           "--out", out, "-q")
    assert code == 0, err
    s = _made(out)
    assert (s.prompt, s.negative_prompt, s.steps, s.seed, s.guidance) == ("a blue star", "blue square", 3, 5, 5.5)
    assert (s.sampler, s.scheduler, s.width, s.height) == ("euler", "uniform", 32, 32)


def test_a_t2i_png_is_made_again_pixel_for_pixel(run_cli, tiny_sd, tmp_path):
    first = tmp_path / "first.png"
    code, _, err = run_cli("generate", "a green triangle", "--model", tiny_sd, "--steps", 2, "--seed", 11,
                           "--sampler", "DPM++ 2M SDE", "--scheduler", "karras", "--guidance", 4, "--out", first, "-q")
    assert code == 0, err
    again = tmp_path / "again.png"
    code, _, err = run_cli("generate", "--from-png", first, "--model", tiny_sd, "--out", again, "-q")
    assert code == 0 and err == ""  # same model: no note
    assert (_made(again).sampler, _made(again).scheduler) == ("dpm++2m-sde", "karras")
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(again)))


def test_a_comfyui_png_runs_its_ksampler_settings(run_cli, tiny_sd, tmp_path):
    graph = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd.safetensors"}},
             "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 40, "height": 32, "batch_size": 1}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a yellow heart", "clip": ["4", 1]}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
             "3": {"class_type": "KSampler", "inputs": {
                 "seed": 9, "steps": 2, "cfg": 6.0, "sampler_name": "euler_ancestral", "scheduler": "sgm_uniform",
                 "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                 "latent_image": ["5", 0]}}}
    info = PngInfo()
    info.add_text("prompt", json.dumps(graph))
    src = tmp_path / "comfy.png"
    Image.new("RGB", (8, 8)).save(src, pnginfo=info)
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "--from-png", src, "--model", tiny_sd, "--out", out, "-q")
    assert code == 0 and err == "", err
    s = _made(out)
    assert (s.prompt, s.seed, s.steps, s.guidance, s.width, s.height) == ("a yellow heart", 9, 2, 6.0, 40, 32)
    assert (s.sampler, s.scheduler) == ("euler-a", "sgm_uniform")


def test_an_a1111_jpeg_and_an_unknown_sampler(run_cli, tiny_sd, tmp_path):
    text = "a purple heart\nSteps: 2, Sampler: DPM++ 3M SDE, CFG scale: 7, Seed: 3, Size: 32x32"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    src = tmp_path / "a.jpg"
    Image.new("RGB", (32, 32)).save(src, exif=exif)
    out = tmp_path / "out.png"
    code, _, err = run_cli("generate", "--from-png", src, "--model", tiny_sd, "--out", out, "-q")
    assert code == 0, err
    assert "note: " in err and "not honoured: sampler DPM++ 3M SDE" in err and "default runs" in err
    assert (_made(out).prompt, _made(out).seed, _made(out).sampler) == ("a purple heart", 3, "dpm++2m")


@pytest.mark.parametrize("extra,words", [
    (["--scheduler", "karras", "--sampler", "euler-a"], ["Euler a", "Karras"]),  # no Karras for Euler a
    ([], ["<lora:ink", "--lora-dir"]),  # a LoRA tag with no --lora-dir: before loading, not after
    (["--prompts-file", "x.txt"], ["--from-png", "--prompts-file"]),
])
def test_bad_from_png_runs_fail_before_the_model_loads(run_cli, a1111_png, tmp_path, no_model_load, extra, words):
    code, out, err = run_cli("generate", "--from-png", a1111_png, *extra, "--out", tmp_path / "o.png", "-q")
    assert code == 2 and out == ""
    line = [x for x in err.splitlines() if x.startswith("t2i: error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), err


def test_no_metadata_is_one_line(run_cli, tmp_path, no_model_load):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, err = run_cli("generate", "--from-png", plain, "--out", tmp_path / "o.png", "-q")
    assert code == 2 and "carries no generation metadata" in err and err.count("\n") == 1


def test_scheduler_flag_is_recorded_and_checked_first(run_cli, tiny_sd, tmp_path, no_model_load):
    code, _, err = run_cli("generate", "x", "--sampler", "ddim", "--scheduler", "karras", "--out", tmp_path / "o")
    assert code == 2 and "DDIM runs on its own steps" in err
    code, _, err = run_cli("generate", "x", "--scheduler", "align_your_steps", "--out", tmp_path / "o")
    assert code == 2 and "no exact diffusers equivalent" in err


def test_samplers_lists_samplers_and_schedules(run_cli):
    code, out, _ = run_cli("samplers")
    assert code == 0
    assert "dpm++2m      DPM++ 2M      karras;" in out and "(default)" in out
    assert "sgm_uniform  SGM Uniform" in out and "dpm++2m-karras" in out
