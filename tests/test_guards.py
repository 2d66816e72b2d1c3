"""Argument checks: exit code 2, one line on stderr, and all of it before any model is loaded."""

from __future__ import annotations

import pytest

from helpers import one_line
from t2i import guards
from t2i.errors import UsageError


@pytest.fixture
def refused(run_cli, tiny_sd, tmp_path, no_model_load):
    """refused(*args) -> the error line of `t2i generate a --model TINY_SD *args`, which must fail early."""

    def run(*args, out=None):
        argv = ["generate", "a", "--model", tiny_sd, "--out", out or tmp_path / "out", *args]
        if args[:1] == ("--prompts-file",):
            argv.remove("a")
        code, stdout, stderr = run_cli(*argv)
        assert code == 2, stderr
        assert stdout == ""
        return one_line(stderr)

    return run


@pytest.mark.parametrize("args, words", [
    (("--width", 65), "width 65 is not a multiple of 8; use 64 or 72"),
    (("--height", 4), "height 4 is too small"),
    (("--width", 5), "use at least 8"),
    (("--steps", 0), "steps must be at least 1"),
    (("--guidance", -1), "guidance must be a finite number"),
    (("--guidance", "nan"), "guidance must be a finite number"),
    (("--guidance", "inf"), "guidance must be a finite number"),
    (("--batch", 0), "batch must be at least 1"),
    (("--batch", 10**6), "at most 100000"),
    (("--seed", -5), "seed -5 is out of range"),
    (("--seed", 2**64), f"seed {2**64} is out of range"),
    (("--sampler", "Euler b"), "unknown sampler 'Euler b'"),
    (("--device", "tpu"), "invalid choice"),
])
def test_bad_numbers_are_refused_before_loading(refused, args, words):
    assert words in refused(*args)


def test_missing_model_path(run_cli, tmp_path, no_model_load):
    code, _, stderr = run_cli("generate", "a", "--model", tmp_path / "missing", "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in one_line(stderr)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_prompt_or_prompts_file_is_required(run_cli, tiny_sd, tmp_path, no_model_load):
    code, _, stderr = run_cli("generate", "--model", tiny_sd, "--out", tmp_path)
    assert code == 2 and "prompt" in one_line(stderr)


def test_unreadable_prompts_files(refused, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "does not exist" in refused("--prompts-file", tmp_path / "missing.txt")
    assert "is a folder" in refused("--prompts-file", tmp_path)
    assert "has no prompts" in refused("--prompts-file", empty)
    assert "not UTF-8" in refused("--prompts-file", binary)


def test_output_that_cannot_be_written(refused, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot be created" in refused(out=blocker / "sub")
    assert "is a file" in refused(out=blocker)
    assert "a-file is a file" in refused(out=blocker / "x.png")
    assert "ending in .png" in refused(out=tmp_path / "image.jpg")
    assert "give a folder" in refused("--prompts-file", _two_prompts(tmp_path), out=tmp_path / "one.png")


def _two_prompts(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("a\nb\n")
    return path


def test_existing_output_is_left_untouched(refused, tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious bytes")
    assert "exists; pass --overwrite" in refused(out=target)
    assert target.read_bytes() == b"precious bytes"
    (tmp_path / "b-1.png").write_bytes(b"also precious")
    assert "b-1.png exists" in refused("--batch", 2, out=tmp_path / "b.png")
    assert (tmp_path / "b-1.png").read_bytes() == b"also precious"
    assert not (tmp_path / "b-0.png").exists()


def test_missing_lora_is_refused_before_loading(refused, tmp_path):
    assert "does not exist" in refused("--lora", tmp_path / "missing.safetensors:0.5")
    assert "not a folder" in refused("--lora-dir", tmp_path / "nope")


def test_a_lora_scale_that_is_not_a_number_is_named_as_the_problem(refused, lora_file):
    line = refused("--lora", f"{lora_file}:abc")
    assert "the scale 'abc' is not a number" in line and f"{lora_file}:0.8" in line and "does not exist" not in line
    assert "no scale after the ':'" in refused("--lora", f"{lora_file}:")


def test_a_prompt_lora_is_found_before_loading(run_cli, tiny_sd, lora_file, tmp_path, no_model_load):
    """<lora:NAME:W> names NAME.safetensors in --lora-dir: a missing one is one line before the model loads,
    in a prompt or in a prompts file."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue star <lora:gone:1>\n")
    common = ["--model", tiny_sd, "--out", tmp_path / "out", "-q"]
    for argv, words in ((["a red circle <lora:inc:0.8>", "--lora-dir", lora_file.parent],
                         f"<lora:inc:...>: no inc.safetensors in {lora_file.parent}; did you mean 'ink'?"),
                        (["--prompts-file", prompts, "--lora-dir", lora_file.parent], "no gone.safetensors"),
                        (["a <lora:ink:1>"], "no LoRA folder is set; pass --lora-dir DIR")):
        code, stdout, stderr = run_cli("generate", *argv, *common)
        assert code == 2 and stdout == ""
        assert words in one_line(stderr)


# --------------------------------------------------------------------------- the functions


def test_check_size_names_the_nearest_sizes():
    guards.check_size(64, 72)
    with pytest.raises(UsageError, match="use 424 or 432"):
        guards.check_size(427, 512)
    with pytest.raises(UsageError, match="height 100 is not a multiple of 16; use 96 or 112"):
        guards.check_size(512, 100, multiple=16)


def test_check_seed_range():
    assert guards.check_seed(0) == 0
    assert guards.check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(UsageError):
            guards.check_seed(bad)


def test_check_writable_folder_makes_missing_folders(tmp_path):
    made = guards.check_writable_folder(tmp_path / "a" / "b")
    assert made.is_dir()
