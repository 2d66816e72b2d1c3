"""Dynamic prompts (t2i.dynamic_prompts through t2i.jobs): {a|b} variants, __wildcards__, random per image from
its seed or every combination, checked before any model loads, recorded so that `reproduce` is exact."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from helpers import one_line
from t2i import dynamic_prompts, jobs, metadata
from t2i.errors import UsageError


@pytest.fixture
def wildcards(tmp_path):
    folder = tmp_path / "wildcards"
    (folder / "shapes").mkdir(parents=True)
    (folder / "colors.txt").write_text("red\nblue\n# a comment line\ngreen\n")
    (folder / "shapes" / "round.txt").write_text("circle\n{oval|ring}\n")  # a nested folder, a nested variant
    (folder / "broken.txt").write_text("__nowhere__\n")
    return folder


def test_the_same_seed_gives_the_same_prompt_and_seeds_vary_it():
    template = "a {red|blue|green|yellow} {circle|square|star}"
    first = [dynamic_prompts.resolve(template, seed) for seed in range(20)]
    assert first == [dynamic_prompts.resolve(template, seed) for seed in range(20)]
    assert first == dynamic_prompts.resolve_many(template, list(range(20)))  # a batch: each seed's own prompt
    assert first[5:8] == dynamic_prompts.resolve_many(template, [5, 6, 7])
    assert len(set(first)) > 3
    assert all(p.startswith("a ") and "{" not in p for p in first)


def test_weighted_variants_follow_their_weights():
    picks = [dynamic_prompts.resolve("{1::red|99::blue}", seed) for seed in range(50)]
    assert picks.count("blue") > 40 and set(picks) <= {"red", "blue"}


def test_combinatorial_makes_every_combination_each_a_prompt_of_its_own(tiny_sd, no_model_load):
    job = jobs.check(jobs.Request(["a {red|blue|green} {circle|square}", "plain"], model=str(tiny_sd),
                                  dynamic_prompts="combinatorial"))
    prompts = job.request.prompts
    assert len(prompts) == 7 and len(set(prompts)) == 7 and prompts[-1] == "plain"
    assert {"a red circle", "a green square"} <= set(prompts)
    assert job.templates == ["a {red|blue|green} {circle|square}"] * 6 + [""]
    assert job.images == 7


def test_combinatorial_has_a_cap_with_a_clear_error(tiny_sd, no_model_load):
    ten = "{" + "|".join("abcdefghij") + "}"
    with pytest.raises(UsageError, match="more than 1000 combinations") as err:
        jobs.check(jobs.Request([ten * 3 + "{x|y}"], model=str(tiny_sd), dynamic_prompts="combinatorial"))
    assert "\n" not in str(err.value)


def test_wildcards_come_from_the_folder_and_its_subfolders(wildcards):
    combos = dynamic_prompts.combinations("a __colors__ __shapes/round__", wildcards)
    assert len(combos) == 9 and "a green ring" in combos and "a red circle" in combos
    assert not any("#" in c or "__" in c for c in combos)
    for seed in range(5):
        color = dynamic_prompts.resolve("__colors__", seed, wildcards)
        assert color in {"red", "blue", "green"}


@pytest.mark.parametrize("prompt, words", [
    ("a __sizes__ circle", "no wildcard file for __sizes__"),
    ("a __broken__ circle", "no wildcard file for __nowhere__"),  # a missing one inside a wildcard file
    ("a __../colors__ circle", "outside --wildcard-dir"),
    ("a {red|blue circle", "not a valid dynamic prompt"),
])
def test_bad_templates_fail_in_one_line_before_loading(no_model_load, tiny_sd, wildcards, prompt, words):
    with pytest.raises(UsageError, match=words) as err:
        jobs.check(jobs.Request([prompt], model=str(tiny_sd), dynamic_prompts="random", wildcard_dir=wildcards))
    assert "\n" not in str(err.value)


def test_a_wildcard_without_a_folder_and_a_missing_folder_are_refused(no_model_load, tiny_sd, tmp_path):
    with pytest.raises(UsageError, match="--wildcard-dir"):
        jobs.check(jobs.Request(["a __colors__"], model=str(tiny_sd), dynamic_prompts="random"))
    with pytest.raises(UsageError, match="is not a folder"):
        jobs.check(jobs.Request(["a {x|y}"], model=str(tiny_sd), dynamic_prompts="random",
                                wildcard_dir=tmp_path / "nowhere"))


def test_literal_prompts_stay_as_written():
    for prompt in ("a red circle", "(castle:1.2), [a:b:0.5], <lora:ink:0.8> BREAK x", "a red} circle",
                   "price $5, snake_case", "C:\\path"):
        assert not dynamic_prompts.is_template(prompt)
    assert dynamic_prompts.is_template("a {red|blue}") and dynamic_prompts.is_template("__colors__")


def test_off_keeps_braces_literal_as_the_server_does(tiny_sd, no_model_load):
    job = jobs.check(jobs.Request(["a {red|blue} circle"], model=str(tiny_sd)))  # the Request default: "off"
    assert job.request.prompts == ["a {red|blue} circle"] and job.templates == []


def test_each_image_of_a_batch_gets_its_seeds_prompt_and_the_pixels_of_that_prompt(sd_pipe, tiny_sd):
    template = "a {red|blue|green|yellow|white} {circle|square}"
    job = jobs.check(jobs.Request([template], model=str(tiny_sd), seed=11, steps=2, batch=4,
                                  dynamic_prompts="random"))
    (result,) = jobs.run(jobs.prepare(sd_pipe, job), job)
    assert [s.seed for s in result.settings] == [11, 12, 13, 14]
    for image, s in result:
        assert s.prompt == dynamic_prompts.resolve(template, s.seed) and s.prompt_template == template
        alone = sd_pipe(s.prompt, seed=s.seed, steps=2, progress=False).images[0]
        assert np.array_equal(np.asarray(image), np.asarray(alone))
        assert metadata.parse_a1111(metadata.a1111_parameters(s))["Prompt"] == s.prompt  # A1111's: the resolved


def test_generate_records_the_template_and_reproduce_is_exact(run_cli, tiny_sd, tmp_path, wildcards):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("generate", "a {big|small} __colors__ circle", "--wildcard-dir", wildcards,
                                   "--model", tiny_sd, "--steps", 2, "--seed", 3, "--batch", 2, "--out", out, "-q")
    assert code == 0, stderr
    paths = stdout.split()
    assert len(paths) == 2
    for path in paths:
        text, settings = metadata.read(path)
        assert settings.prompt_template == "a {big|small} __colors__ circle"
        assert text.splitlines()[0] == settings.prompt == dynamic_prompts.resolve(settings.prompt_template,
                                                                                   settings.seed, wildcards)
        assert "{" not in text and "__" not in text  # the template is in the JSON chunk only
    code, stdout, stderr = run_cli("reproduce", paths[1], "-q")
    assert code == 0 and "bit for bit" in stdout, stderr


def test_generate_combinatorial_and_literal_flags(run_cli, tiny_sd, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("generate", "a {red|blue} circle", "--combinatorial", "--model", tiny_sd,
                                   "--steps", 1, "--seed", 2, "--out", out, "-q")
    assert code == 0, stderr
    prompts = [metadata.read(p)[1].prompt for p in stdout.split()]
    assert prompts == ["a red circle", "a blue circle"]  # each combination from the same seed
    assert {metadata.read(p)[1].seed for p in stdout.split()} == {2}
    code, stdout, _ = run_cli("generate", "a {red|blue} circle", "--no-dynamic-prompts", "--model", tiny_sd,
                              "--steps", 1, "--seed", 2, "--out", out, "-q")
    assert code == 0 and metadata.read(stdout.strip())[1].prompt == "a {red|blue} circle"


def test_generate_refuses_a_missing_wildcard_before_loading(no_model_load, run_cli, tiny_sd, tmp_path, wildcards):
    code, _, stderr = run_cli("generate", "a __sizes__ circle", "--wildcard-dir", wildcards, "--model", tiny_sd,
                              "--out", tmp_path / "out")
    assert code == 2 and "sizes.txt" in one_line(stderr)
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_the_grammar_or_torch():
    code = """
import sys
from t2i.cli import main
for argv in (["generate", "--help"], ["grid", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted(m for m in ("torch", "dynamicprompts", "pyparsing", "PIL") if m in sys.modules))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"
