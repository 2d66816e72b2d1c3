"""`t2i grid` end to end on the tiny SD model: cells as single generations, the labelled grid, metadata."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import one_line
from t2i import grid, metadata


def test_grid_cells_are_single_generations_with_their_own_metadata(run_cli, sd_pipe, tiny_sd, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("grid", "a red circle", "--x", "steps=1,2", "--y", "sampler=Euler,DDIM",
                                   "--seed", 4, "--model", tiny_sd, "--out", out)
    assert code == 0, stderr
    paths = stdout.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000-4.png", "00001-4.png", "00002-4.png", "00003-4.png",
                                                     "xyz_grid-00000-4.png"]
    assert "6/6" in stderr  # one bar over the whole grid: 1 + 2 + 1 + 2 steps
    cells = [(1, "euler"), (2, "euler"), (1, "ddim"), (2, "ddim")]  # x varies fastest
    for path, (steps, sampler) in zip(paths, cells):
        _, s = metadata.read(path)
        assert (s.steps, s.sampler, s.seed, s.prompt) == (steps, sampler, 4, "a red circle")
    # a cell is the image the same single generation makes
    alone = sd_pipe("a red circle", seed=4, steps=2, sampler="ddim", progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(paths[3]).convert("RGB")), np.asarray(alone))

    # the grid: every cell in place, labels in the margins, the first image's parameters plus the axes
    axes = [grid.parse_axis("steps=1,2"), grid.parse_axis("sampler=Euler,DDIM", "--y")]
    plan = grid.layout(axes, 32, 32)[0]
    image = np.asarray(Image.open(paths[-1]).convert("RGB"))
    assert image.shape[:2] == (plan.size[1], plan.size[0]) == (plan.top + 64, plan.left + 64)
    for i, path in enumerate(paths[:4]):
        x, y = plan.cell_origin(i % 2, i // 2, 0)
        assert np.array_equal(image[y:y + 32, x:x + 32], np.asarray(Image.open(path).convert("RGB")))
    assert (image[:plan.top, plan.left:].max(axis=-1) < 100).any()  # the X labels
    text, settings = metadata.read(paths[-1])
    fields = metadata.parse_a1111(text)
    assert (fields["Script"], fields["X Type"], fields["X Values"], fields["Y Type"]) == \
        ("X/Y/Z plot", "Steps", "1,2", "Sampler")
    assert (fields["Steps"], fields["Sampler"]) == ("1", "Euler")  # the first image's, as A1111 writes
    assert settings.steps == 1

    code, stdout, stderr = run_cli("reproduce", paths[-1])
    assert code == 2 and "grid" in one_line(stderr)
    code, stdout, stderr = run_cli("reproduce", paths[2], "-q")
    assert code == 0 and "bit for bit" in stdout


def test_grid_with_a_prompt_sr_and_a_dynamic_prompt(run_cli, tiny_sd, tmp_path):
    code, stdout, stderr = run_cli("grid", "a {big|small} red circle", "--x", "Prompt S/R=red,blue", "--seed", 9,
                                   "--steps", 1, "--model", tiny_sd, "--out", tmp_path, "-q")
    assert code == 0, stderr
    first, second = (metadata.read(p)[1] for p in stdout.split()[:2])
    assert first.prompt_template == "a {big|small} red circle"
    assert second.prompt_template == "a {big|small} blue circle"
    assert first.prompt.replace("red", "blue") == second.prompt  # the same seed picks the same variant


@pytest.mark.parametrize("args, words", [
    (["--x", "steps=2", "--y", "sampler=Euler a,Eulr"], "--y sampler value 'Eulr': unknown sampler"),
    (["--x", "stepz=2"], "unknown grid axis 'stepz'"),
    (["--x", "steps=2,0"], "--x steps value 0"),
    (["--x", "lora-scale=0.5,1"], "--lora"),
    (["--x", "steps=1,2", "--y", "steps=3"], "two axes set steps"),
    (["--x", "steps=1", "--z", "cfg=1,2"], "--z needs a --y"),
    (["--x", "steps=1", "--batch", "2"], "one image per cell"),
    (["--x", "steps=1", "--combinatorial"], "Prompt S/R"),
    (["--x", "steps=1", "--out", "grid.png"], "folder"),
    (["--x", "seed=1-30", "--y", "steps=1-30", "-W", 1024, "-H", 1024], "MP"),
])
def test_bad_grids_fail_in_one_line_before_loading(no_model_load, run_cli, tiny_sd, tmp_path, args, words):
    code, _, stderr = run_cli("grid", "a red circle", "--model", tiny_sd, *args)
    assert code == 2 and words in one_line(stderr)
