"""`t2i` end to end on the tiny SD model: generate, samplers, help, and the error contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from helpers import one_line, pixels
from t2i import metadata
from t2i.samplers import SAMPLERS


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_generate_writes_pngs_and_prints_only_their_paths(run_cli, tiny_sd, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("generate", "a red circle", "--model", tiny_sd, "--steps", 2, "--seed", 5,
                                   "--batch", 2, "--out", out)
    assert code == 0
    written = _pngs(out)
    assert [p.name for p in written] == ["00000-5.png", "00001-6.png"]
    assert stdout.splitlines() == [str(p) for p in written]  # paths only, one per line
    assert "step" in stderr  # the progress bar goes to stderr
    for path, seed in zip(written, (5, 6)):
        _, settings = metadata.read(path)
        assert (settings.seed, settings.steps, settings.batch_size) == (seed, 2, 2)
        assert Image.open(path).size == (32, 32)  # the model's native size by default


def test_generate_numbers_on_after_existing_files(run_cli, tiny_sd, tmp_path):
    for seed in (1, 1):
        code, stdout, _ = run_cli("generate", "a", "--model", tiny_sd, "--steps", 1, "--seed", seed, "--out", tmp_path,
                                  "-q")
        assert code == 0
    assert [p.name for p in _pngs(tmp_path)] == ["00000-1.png", "00001-1.png"]


def test_generate_options_reach_the_image(run_cli, tiny_sd, tmp_path):
    target = tmp_path / "sub" / "one.png"
    code, stdout, stderr = run_cli(
        "generate", "a blue square", "--model", tiny_sd, "--steps", 3, "--seed", 11, "--out", target,
        "--negative-prompt", "green", "--sampler", "Euler a", "--width", 48, "--height", 40, "--guidance", 3.5,
        "--device", "cpu", "--dtype", "fp32", "--quiet",
    )
    assert code == 0, stderr
    assert stdout.splitlines() == [str(target)]
    assert stderr == ""  # --quiet: no bar
    assert Image.open(target).size == (48, 40)
    _, s = metadata.read(target)
    assert (s.prompt, s.negative_prompt, s.sampler, s.steps, s.seed) == ("a blue square", "green", "euler-a", 3, 11)
    assert (s.width, s.height, s.guidance, s.device, s.dtype) == (48, 40, 3.5, "cpu", "fp32")


def test_generate_prompts_file_runs_each_prompt_from_the_seed(run_cli, tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red circle\n\na blue star\n")
    code, stdout, _ = run_cli("generate", "--prompts-file", prompts, "--model", tiny_sd, "--steps", 2, "--seed", 4,
                              "--out", tmp_path / "out", "-q")
    assert code == 0
    paths = [Path(line) for line in stdout.splitlines()]
    assert len(paths) == 2
    settings = [metadata.read(p)[1] for p in paths]
    assert [(s.prompt, s.seed) for s in settings] == [("a red circle", 4), ("a blue star", 4)]
    assert (pixels(Image.open(paths[0])) != pixels(Image.open(paths[1]))).any()  # the prompt matters


def test_overwrite_replaces_an_existing_file(run_cli, tiny_sd, tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    code, _, _ = run_cli("generate", "a", "--model", tiny_sd, "--steps", 1, "--seed", 1, "--out", target,
                         "--overwrite", "-q")
    assert code == 0
    assert metadata.read(target)[1].seed == 1


def test_images_get_the_users_usual_file_mode(run_cli, tiny_sd, tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    try:
        code, _, _ = run_cli("generate", "a", "--model", tiny_sd, "--steps", 1, "--out", tmp_path / "x.png", "-q")
    finally:
        os.umask(mask)
    assert code == 0
    assert stat.S_IMODE((tmp_path / "x.png").stat().st_mode) == 0o644  # not mkstemp's private 0600


def test_help_mentions_the_options(run_cli):
    for argv, words in ((["--help"], ["generate", "samplers", "info", "reproduce"]),
                        (["generate", "--help"], ["--model", "--steps", "--seed", "--sampler", "--batch", "--out",
                                                  "--negative-prompt", "--prompts-file", "--allow-pickle"])):
        code, stdout, _ = run_cli(*argv)
        assert code == 0
        for word in words:
            assert word in stdout


def test_samplers_lists_every_name_and_its_a1111_name(run_cli):
    code, stdout, _ = run_cli("samplers")
    assert code == 0
    samplers_table = stdout.split("\n\n")[0]  # then the schedules
    rows = {line.split()[0]: line for line in samplers_table.splitlines()[1:]}
    assert set(rows) == set(SAMPLERS)
    for name, sampler in SAMPLERS.items():
        assert sampler.a1111 in rows[name]


def test_unknown_sampler_is_exit_2_listing_valid_names(run_cli, tiny_sd, tmp_path, no_model_load):
    code, stdout, stderr = run_cli("generate", "a", "--model", tiny_sd, "--sampler", "nope", "--out", tmp_path)
    assert code == 2 and stdout == ""
    line = one_line(stderr)
    assert "nope" in line and "euler-a" in line and "dpm++2m" in line


def test_info_prints_a1111_text_and_json(run_cli, tiny_sd, tmp_path):
    target = tmp_path / "i.png"
    assert run_cli("generate", "a star", "--model", tiny_sd, "--steps", 2, "--seed", 9, "--out", target, "-q")[0] == 0
    code, stdout, _ = run_cli("info", target)
    assert code == 0
    assert stdout.splitlines()[0] == "a star"
    assert "Seed: 9" in stdout and "Steps: 2" in stdout
    code, stdout, _ = run_cli("info", "--json", target)
    assert code == 0
    data = json.loads(stdout)
    assert (data["prompt"], data["seed"], data["model"]) == ("a star", 9, str(tiny_sd))


def test_info_on_an_image_without_metadata_is_exit_2(run_cli, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, stderr = run_cli("info", plain)
    assert code == 2
    assert "no generation metadata" in one_line(stderr)


# --------------------------------------------------------------------------- the process contract


def _t2i(*argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "t2i.cli", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04K\x01.")  # a pickle: refused by name and content, never opened by torch
    p = _t2i("generate", "a", "--model", bad, "--out", tmp_path / "out", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stdout == ""
    line = one_line(p.stderr)
    assert line.startswith("t2i: error:") and "--allow-pickle" in line


def test_process_argparse_errors_are_one_line_exit_2(tmp_path):
    p = _t2i("generate", "a", "--steps", "many", cwd=tmp_path)
    assert p.returncode == 2
    assert "--steps" in one_line(p.stderr)


def test_a_prompts_file_split_across_two_processes_writes_what_one_process_writes(run_cli, tiny_sd, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m t2i.cli generate --prompts-file ...` (CPU processes,
    gloo): the same file names and the same pixels as a single process."""
    import numpy as np

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\na blue square\ntwo green stars\n")
    common = ["--prompts-file", prompts, "--model", tiny_sd, "--steps", 2, "--batch", 2, "--seed", 7, "-q"]
    code, _, stderr = run_cli("generate", *common, "--out", tmp_path / "one")
    assert code == 0, stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "t2i.cli", "generate", *map(str, common), "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _pngs(tmp_path / "one"), _pngs(tmp_path / "two")
    assert [p.name for p in one] == [p.name for p in two] == [
        "00000-7.png", "00001-8.png", "00002-7.png", "00003-8.png", "00004-7.png", "00005-8.png"]
    assert sorted(proc.stdout.split()) == sorted(str(p) for p in two)  # each image printed once, by its process
    for a, b in zip(one, two):
        assert np.array_equal(pixels(Image.open(a)), pixels(Image.open(b))), a.name
        assert metadata.read(a)[1].prompt == metadata.read(b)[1].prompt


def test_generate_puts_off_scipy_stats_and_it_still_works_when_used(tiny_sd, tmp_path):
    """Every diffusers scheduler module imports scipy.stats (about 1 s of start-up) for beta sigmas only;
    the `t2i` process defers it, and the first real use loads it."""
    code = f"""
import sys
from t2i.cli import run
sys.argv = ["t2i", "generate", "a red circle", "--model", {str(tiny_sd)!r}, "--steps", "2", "--seed", "1",
            "--sampler", "DPM++ 2M Karras", "--out", {str(tmp_path / 'out')!r}, "-q"]
try:
    run()
except SystemExit as e:
    assert e.code == 0
print("loaded" if "scipy.stats._stats_py" in sys.modules else "deferred")
from diffusers import DPMSolverMultistepScheduler
s = DPMSolverMultistepScheduler(use_beta_sigmas=True)
s.set_timesteps(5)
from scipy import stats
print(len(s.sigmas), stats.beta.ppf(0.5, 2, 2))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[1:] == ["deferred", "6", "0.5"]  # after the PNG path


def test_main_in_process_leaves_the_garbage_collector_as_it_found_it(run_cli):
    """Start-up turns collections off while importing and loading; in-process callers get them back,
    and nothing is frozen (only the `t2i` process's exit freezes)."""
    import gc

    frozen = gc.get_freeze_count()
    code, stdout, _ = run_cli("samplers")
    assert code == 0 and "DPM++ 2M Karras" in stdout
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen
    gc.disable()
    try:
        run_cli("samplers")
        assert not gc.isenabled()  # a caller's own choice is kept
    finally:
        gc.enable()


# --------------------------------------------------------------------------- the terminal


def test_written_paths_start_their_own_lines_after_the_finished_bar(tiny_sd, tmp_path, monkeypatch):
    """In a terminal stdout and stderr are one stream: each path must start a line (not follow the bar's
    last refresh on its line), the bar must have finished before the first path, and no empty `0step` bar
    may be drawn before the total is known."""
    import io

    from t2i.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue star\n")
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    code = main(["generate", "--prompts-file", str(prompts), "--model", str(tiny_sd), "--steps", "3", "--seed", "1",
                 "--out", str(tmp_path / "out")])
    monkeypatch.undo()
    text = terminal.getvalue()
    assert code == 0, text
    lines = text.replace("\r", "\n").split("\n")
    paths = [str(p) for p in _pngs(tmp_path / "out")]
    assert len(paths) == 2 and all(p in lines for p in paths), text  # whole lines, nothing glued on
    assert not re.search(r"(?<![\d.])0step", text)  # no bar drawn with an unknown total ("generating: 0step")
    last = text.index(paths[1])
    assert "6/6" in text[:last] and "generating" not in text[last:], text  # the finished bar, then the last path


def test_reproduce_labels_its_bar_by_what_it_does(run_cli, tiny_sd, tmp_path):
    target = tmp_path / "r.png"
    assert run_cli("generate", "a", "--model", tiny_sd, "--steps", 2, "--seed", 3, "--out", target, "-q")[0] == 0
    code, stdout, stderr = run_cli("reproduce", target)
    assert code == 0 and "bit for bit" in stdout
    assert "reproducing" in stderr and "text2image" not in stderr and not re.search(r"(?<![\d.])0step", stderr)


# --------------------------------------------------------------------------- help, mistakes and interruptions


def test_help_and_argument_errors_do_not_import_torch():
    code = """
import sys
from t2i.cli import main
for argv in (["--help"], ["generate", "--help"], ["bench", "--help"], ["eval", "--help"], ["train", "lora", "--help"],
             ["train", "embedding", "--help"], ["generate", "a", "--steps", "many"], ["genrate", "a"], ["generate", "a", "--device", "cuad"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "diffusers", "transformers", "PIL", "tqdm") if m in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"


def test_a_mistyped_command_or_choice_gets_a_did_you_mean(run_cli):
    code, _, stderr = run_cli("genrate", "a red circle")
    assert code == 2 and "did you mean 'generate'?" in one_line(stderr)
    code, _, stderr = run_cli("generate", "a", "--device", "cuad")
    assert code == 2 and "did you mean 'cuda'?" in one_line(stderr)
    code, _, stderr = run_cli("train", "lroa")
    assert code == 2 and "did you mean 'lora'?" in one_line(stderr)


def test_a_mistyped_sampler_or_model_gets_a_did_you_mean(run_cli, sd_copy, tmp_path, no_model_load):
    code, _, stderr = run_cli("generate", "a", "--model", sd_copy, "--sampler", "eulr a", "--out", tmp_path / "o")
    assert code == 2 and "did you mean 'euler-a'" in one_line(stderr)
    code, _, stderr = run_cli("generate", "a", "--model", tmp_path / "modle", "--out", tmp_path / "o")
    assert code == 2 and f"did you mean '{sd_copy}'?" in one_line(stderr)


def test_an_interrupted_or_failed_run_leaves_no_empty_folder_it_made(run_cli, tiny_sd, tmp_path, monkeypatch):
    from t2i import jobs
    from t2i.errors import ModelLoadError

    for stop, code in ((KeyboardInterrupt, 130), (ModelLoadError("the model broke"), 2)):
        def load(*args, **kwargs):
            raise stop

        monkeypatch.setattr(jobs, "load", load)
        new, kept = tmp_path / "new" / "deeper", tmp_path / "kept"
        kept.mkdir(exist_ok=True)
        assert run_cli("generate", "a", "--model", tiny_sd, "--out", new, "-q")[0] == code
        assert run_cli("generate", "a", "--model", tiny_sd, "--out", kept, "-q")[0] == code
        assert run_cli("generate", "a", "--model", tiny_sd, "--out", tmp_path / "png" / "one.png", "-q")[0] == code
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # made by the run and empty: gone
        assert list(kept.iterdir()) == []


# --------------------------------------------------------------------------- errors and notices


def test_debug_shows_the_traceback_behind_the_one_line_error(run_cli, tmp_path, monkeypatch):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    code, _, stderr = run_cli("info", plain)
    assert code == 2 and "Traceback" not in stderr
    for argv, env in ((["--debug", "info", plain], None), (["info", plain], "1")):
        if env:
            monkeypatch.setenv("T2I_DEBUG", env)
        code, _, stderr = run_cli(*argv)
        assert code == 2
        assert "Traceback (most recent call last)" in stderr and "cmd_info" in stderr
        assert stderr.strip().splitlines()[-1].startswith("t2i: error:") and "no generation metadata" in stderr


def test_notices_are_logged_and_the_cli_shows_them_as_notes(run_cli, tiny_sd, tmp_path, caplog):
    init = tmp_path / "odd.png"
    Image.new("RGB", (37, 30), (200, 40, 40)).save(init)
    code, _, stderr = run_cli("img2img", "a", "--init", init, "--model", tiny_sd, "--steps", 2, "--seed", 1,
                              "--out", tmp_path / "o", "-q")
    assert code == 0
    assert stderr.splitlines() == ["note: init image 37x30 resized to 38x30 (sides must be multiples of 2)"]
    from t2i.pipelines import Image2Image

    pipe = Image2Image.from_pretrained(str(tiny_sd), device="cpu")
    with caplog.at_level("WARNING", logger="t2i"):
        pipe("a", init, strength=0.5, steps=2, seed=1, progress=False)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("t2i.pipelines.image2image", "init image 37x30 resized to 38x30 (sides must be multiples of 2)")]
