"""PNG metadata (A1111 `parameters` + t2i JSON), `t2i info`, `t2i reproduce`, and LoRA records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import pixels
from t2i import metadata
from t2i.settings import LoraSpec, Settings


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_sd):
    """One PNG written by `t2i generate` with a negative prompt and an A1111 sampler name."""
    from t2i.cli import main

    out = tmp_path_factory.mktemp("made") / "img.png"
    code = main(["generate", "a red circle, (big:1.2)", "--negative-prompt", "blue, green", "--model", str(tiny_sd),
                 "--steps", "2", "--seed", "42", "--sampler", "Euler a", "--guidance", "6.5", "--out", str(out), "-q"])
    assert code == 0
    return out


def test_png_carries_a1111_parameters_and_t2i_json(made, tiny_sd):
    with Image.open(made) as im:
        text = im.text
    lines = text["parameters"].split("\n")
    assert lines[0] == "a red circle, (big:1.2)"
    assert lines[1] == "Negative prompt: blue, green"
    _, settings = metadata.read(made)
    assert lines[2].startswith(
        f"Steps: 2, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.5, Seed: 42, Size: 32x32, Model hash: {settings.model_hash}, "
        f"Model: {tiny_sd.name}"
    )
    data = json.loads(text["t2i"])
    assert (data["prompt"], data["seed"], data["sampler"], data["guidance"]) == ("a red circle, (big:1.2)", 42,
                                                                               "euler-a", 6.5)
    assert data["versions"]["diffusers"]


def test_parse_a1111_reads_the_written_fields(made):
    text, _ = metadata.read(made)
    fields = metadata.parse_a1111(text)
    assert fields["Prompt"] == "a red circle, (big:1.2)"
    assert fields["Negative prompt"] == "blue, green"
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Seed"], fields["Size"]) == (
        "2", "Euler a", "6.5", "42", "32x32")


def test_parse_a1111_round_trips_quoted_values():
    s = Settings(prompt="a castle\nat night", negative_prompt="", steps=25, sampler="dpm++2m-karras", guidance=7,
                 seed=2**40, width=512, height=768, model_name='my, "best": model', model_hash="0123456789abcdef",
                 loras=[LoraSpec("a.safetensors", 0.5, "ink", "aaaaaaaaaaaabbbb"),
                        LoraSpec("b.safetensors", 1.0, "film", "cccccccccccc")])
    fields = metadata.parse_a1111(metadata.a1111_parameters(s))
    assert fields["Prompt"] == "a castle\nat night <lora:ink:0.5> <lora:film:1>"
    assert "Negative prompt" not in fields
    assert fields["Model"] == 'my, "best": model'
    assert fields["Model hash"] == "0123456789"
    assert fields["Lora hashes"] == "ink: aaaaaaaaaaaa, film: cccccccccccc"
    # an old record's combined sampler name is written apart, as A1111 1.9+ does
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["Seed"], fields["Size"]) == (
        "25", "DPM++ 2M", "Karras", str(2**40), "512x768")


def test_parse_a1111_reads_a1111s_own_text():
    text = ('masterpiece, 1girl\nNegative prompt: lowres\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, '
            'Seed: 123, Size: 512x768, Model hash: abcdef1234, Model: anything-v5, '
            'Lora hashes: "detail: 0123456789ab, style: ba9876543210", Version: v1.6.0')
    fields = metadata.parse_a1111(text)
    assert fields["Prompt"] == "masterpiece, 1girl"
    assert fields["Negative prompt"] == "lowres"
    assert fields["Lora hashes"] == "detail: 0123456789ab, style: ba9876543210"
    assert fields["Version"] == "v1.6.0"


def test_settings_json_round_trip():
    s = Settings(prompt="x", seed=5, loras=[LoraSpec("l.safetensors", 0.7, "l", "h")], versions={"t2i": "0"})
    assert Settings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Settings.from_dict({**s.to_dict(), "from_the_future": 1}) == s  # unknown keys are ignored


# --------------------------------------------------------------------------- reproduce


def test_reproduce_is_bit_for_bit(run_cli, made):
    code, stdout, _ = run_cli("reproduce", made, "-q")
    assert code == 0
    assert "bit for bit" in stdout


def test_reproduce_reports_a_difference(run_cli, made, tmp_path):
    _, settings = metadata.read(made)
    tampered = tmp_path / "tampered.png"
    with Image.open(made) as im:
        im.save(tampered, pnginfo=metadata.png_info(replace(settings, seed=settings.seed + 1)))
    code, stdout, _ = run_cli("reproduce", tampered, "-q")
    assert code == 1
    assert "differs" in stdout


def test_reproduce_saves_the_new_image(run_cli, made, tmp_path):
    again = tmp_path / "again.png"
    code, stdout, _ = run_cli("reproduce", made, "--out", again, "-q")
    assert code == 0 and str(again) in stdout
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(made)))


def test_reproduce_an_image_from_the_middle_of_a_batch(run_cli, tiny_sd, tmp_path):
    code, stdout, _ = run_cli("generate", "a blue star", "--model", tiny_sd, "--steps", 2, "--seed", 8, "--batch", 2,
                              "--sampler", "euler-a", "--out", tmp_path, "-q")
    assert code == 0
    second = Path(stdout.splitlines()[1])
    assert metadata.read(second)[1].batch_index == 1
    code, stdout, _ = run_cli("reproduce", second, "-q")
    assert code == 0 and "bit for bit" in stdout


def test_reproduce_needs_t2i_settings(run_cli, tmp_path):
    a1111_only = tmp_path / "a1111.png"
    info = metadata.PngInfo()
    info.add_text("parameters", "x\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32")
    Image.new("RGB", (32, 32)).save(a1111_only, pnginfo=info)
    code, _, stderr = run_cli("reproduce", a1111_only)
    assert code == 2 and "no t2i settings" in stderr


# --------------------------------------------------------------------------- LoRA


def test_lora_changes_the_image_and_is_recorded(run_cli, tiny_sd, lora_file, tmp_path):
    from t2i.lora.apply import lora_hash

    def make(name, *lora):
        code, _, stderr = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 3,
                                  "--out", tmp_path / name, "-q", *lora)
        assert code == 0, stderr
        return tmp_path / name

    plain, half, zero = make("plain.png"), make("half.png", "--lora", f"{lora_file}:0.5"), \
        make("zero.png", "--lora", f"{lora_file}:0")
    px = {p: pixels(Image.open(p)) for p in (plain, half, zero)}
    assert not np.array_equal(px[plain], px[half])
    assert np.array_equal(px[plain], px[zero])
    text, settings = metadata.read(half)
    assert settings.loras[0].scale == 0.5 and settings.loras[0].name == "ink"
    fields = metadata.parse_a1111(text)
    assert fields["Lora hashes"] == f"ink: {lora_hash(lora_file)}"
    assert fields["Prompt"].endswith("<lora:ink:0.5>")
    code, stdout, _ = run_cli("reproduce", half, "-q")
    assert code == 0 and "bit for bit" in stdout


def test_lora_tag_in_the_prompt_uses_lora_dir(run_cli, tiny_sd, lora_file, tmp_path):
    args = ("--model", tiny_sd, "--steps", 2, "--seed", 3, "-q")
    assert run_cli("generate", "a red circle <lora:ink:0.5>", "--lora-dir", lora_file.parent, "--out",
                   tmp_path / "tag.png", *args)[0] == 0
    assert run_cli("generate", "a red circle", "--lora", f"{lora_file}:0.5", "--out", tmp_path / "arg.png",
                   *args)[0] == 0
    assert np.array_equal(pixels(Image.open(tmp_path / "tag.png")), pixels(Image.open(tmp_path / "arg.png")))
    code, _, stderr = run_cli("generate", "a <lora:ink:0.5>", "--out", tmp_path / "x.png", *args)
    assert code == 2 and "--lora-dir" in stderr


def test_reading_metadata_imports_neither_torch_nor_diffusers():
    """Scripts that read or write PNG metadata (t2i.metadata) start in a fraction of a second."""
    import subprocess
    import sys

    code = "import sys, t2i.metadata; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
