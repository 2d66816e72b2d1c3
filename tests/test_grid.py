"""X/Y/Z grids (t2i.grid): axis values and ranges, the plan through t2i.jobs, the labelled drawing."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from t2i import grid, jobs, metadata
from t2i.errors import UsageError


@pytest.mark.parametrize("spec, name, values", [
    ("steps=10,20,30", "steps", [10, 20, 30]),
    ("Steps=10-30 (+10)", "steps", [10, 20, 30]),
    ("steps=30-10 (-10)", "steps", [30, 20, 10]),
    ("seed=1-3", "seed", [1, 2, 3]),
    ("CFG Scale=1-9 [5]", "cfg", [1.0, 3.0, 5.0, 7.0, 9.0]),
    ("cfg=0.5-2 (+0.5), 7", "cfg", [0.5, 1.0, 1.5, 2.0, 7.0]),
    ("sampler=Euler a, DPM++ 2M", "sampler", ["Euler a", "DPM++ 2M"]),
    ('Prompt S/R=red,"blue, dark"', "prompt-sr", ["red", "blue, dark"]),  # CSV: a quoted value keeps its comma
    ("Checkpoint name=models/a, b", "model", ["models/a", "b"]),
    ("VAE=None,vaes/x.safetensors", "vae", ["None", "vaes/x.safetensors"]),
    ("Hires upscale=1.5-2.5 [3]", "hires-scale", [1.5, 2.0, 2.5]),
    ("Hires steps=0,5", "hires-steps", [0, 5]),
    ("Denoising=0.3-0.7 (+0.2)", "hires-denoise", [0.3, 0.5, 0.7]),
    ("hires-upscaler=Latent (bicubic),lanczos", "hires-upscaler", ["Latent (bicubic)", "lanczos"]),
])
def test_axis_values_and_ranges_read_as_a1111_does(spec, name, values):
    a = grid.parse_axis(spec)
    assert (a.axis.name, a.values) == (name, values)


@pytest.mark.parametrize("spec, words", [
    ("stepz=1,2", "unknown grid axis 'stepz' (did you mean 'steps'?)"),
    ("steps", "NAME=VALUES"),
    ("steps=ten", "'ten' is not a whole number"),
    ("steps=1.5-3", "not a range of whole numbers"),
    ("steps=1-5 (-1)", "never reaches"),
    ("cfg=", "at least one value"),
])
def test_bad_axes_are_one_line_errors(spec, words):
    with pytest.raises(UsageError, match=re.escape(words)) as err:
        grid.parse_axis(spec, "--y")
    assert "\n" not in str(err.value) and "--y" in str(err.value)


def test_every_axis_sets_a_field_jobs_takes(tiny_sd, no_model_load):
    base = jobs.Request(["a red circle"], model=str(tiny_sd), loras=[])
    fields = set(jobs.Request.__dataclass_fields__)
    samples = {int: 8, float: 1.5, str: "Euler"}
    for axis in grid.AXES.values():
        value = "red" if axis.name == "prompt-sr" else samples[axis.kind]
        changed = axis.apply(base, value, [value])
        assert changed and set(changed) <= fields, axis.name


def test_the_plan_checks_every_cell_and_fixes_one_seed(tiny_sd, no_model_load):
    axes = [grid.parse_axis("steps=1,2"), grid.parse_axis("Prompt S/R=red,blue", "--y")]
    cells = grid.plan(jobs.Request(["a red circle"], model=str(tiny_sd)), axes)
    assert [c.index for c in cells] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    requests = [c.job.request for c in cells]
    assert [(r.steps, r.prompts[0]) for r in requests] == [(1, "a red circle"), (2, "a red circle"),
                                                           (1, "a blue circle"), (2, "a blue circle")]
    assert len({r.seed for r in requests}) == 1 and requests[0].seed != -1  # one random seed for the grid


@pytest.mark.parametrize("specs, words", [
    (["sampler=Euler a,Eulr"], "--x sampler value 'Eulr': unknown sampler"),
    (["steps=2,0"], "--x steps value 0: steps must be at least 1"),
    (["width=32,100"], "--x width value 100: width 100 is not a multiple of 8"),
    (["Prompt S/R=dog,cat"], "'dog' (the first value, the one replaced) is not in the prompt"),
    (["seed=1-40", "steps=1-30"], "1200 cells"),
])
def test_the_plan_names_the_axis_of_a_bad_value_before_loading(tiny_sd, no_model_load, specs, words):
    axes = [grid.parse_axis(s) for s in specs]
    with pytest.raises(UsageError, match=re.escape(words)) as err:
        grid.plan(jobs.Request(["a red circle"], model=str(tiny_sd)), axes)
    assert "\n" not in str(err.value)


def _cells(axes, size=(40, 24)):
    """Cells of solid colours (no model): each cell's colour says its place."""
    cells = []
    for iz in range(len(axes[2].values) if len(axes) > 2 else 1):
        for iy in range(len(axes[1].values) if len(axes) > 1 else 1):
            for ix in range(len(axes[0].values)):
                image = Image.new("RGB", size, (40 * ix + 10, 40 * iy + 10, 40 * iz + 10))
                cells.append(grid.Cell((ix, iy, iz), None, SimpleNamespace(images=[image])))
    return cells


def test_the_grid_holds_each_cell_and_labels_in_its_margins():
    axes = [grid.parse_axis("steps=10,20,30"), grid.parse_axis("sampler=Euler a,DPM++ 2M Karras", "--y")]
    cells = _cells(axes)
    image, plan = grid.draw(cells, axes)
    assert image.size == plan.size == (plan.left + 3 * 40, plan.top + 2 * 24)  # cells + label margins
    assert plan.left > 0 and plan.top > 0
    pixels = np.asarray(image)
    for c in cells:
        x, y = plan.cell_origin(*c.index)
        assert np.array_equal(pixels[y:y + 24, x:x + 40], np.asarray(c.result.images[0]))
    dark = pixels.max(axis=-1) < 100  # black text on white
    assert dark[:plan.top, plan.left:].any() and dark[plan.top:, :plan.left].any()  # column and row labels


def test_a_z_axis_puts_one_sub_grid_per_value_side_by_side():
    axes = [grid.parse_axis("steps=1,2"), grid.parse_axis("cfg=3,5", "--y"), grid.parse_axis("seed=1,2,3", "--z")]
    cells = _cells(axes)
    image, plan = grid.draw(cells, axes)
    assert plan.grids == 3 and plan.title > 0
    assert image.size == (3 * (plan.left + 2 * 40) + 2 * plan.gap, plan.title + plan.top + 2 * 24)
    x, y = plan.cell_origin(1, 1, 2)
    assert tuple(np.asarray(image)[y + 5, x + 5]) == (50, 50, 90)


def test_a_grid_too_large_is_refused_before_any_cell():
    axes = [grid.parse_axis("seed=1-30"), grid.parse_axis("steps=1-30", "--y")]
    with pytest.raises(UsageError, match="MP"):
        grid.check_pixels(axes, 1024, 1024)
    grid.check_pixels(axes, 64, 64)


def test_a1111_grid_fields():
    axes = [grid.parse_axis("steps=10-30 (+10)"), grid.parse_axis("seed=1,2", "--y")]
    fields = grid.a1111_fields(axes)
    assert fields == {"Script": "X/Y/Z plot", "X Type": "Steps", "X Values": "10-30 (+10)", "Y Type": "Seed",
                      "Y Values": "1,2", "Fixed Y Values": "1, 2"}


def test_the_grid_bar_knows_its_whole_total_and_takes_each_calls_real_steps(capsys):
    from t2i.progress import PlannedBar

    bar = PlannedBar("grid", [2, 2, 2])  # three cells of 2 steps each, expected
    bar.total = bar.total + 2  # the first call reports its steps, as a pipeline does at its first step
    assert bar.total == 6  # the whole grid from the start, not 2
    bar.total = bar.total + 4  # a second-order sampler ran 4 steps for its 2
    assert bar.total == 8
    bar.total = bar.total + 2
    assert bar.total == 8
    bar.close()


# --------------------------------------------------------------------------- model, VAE and hires fix axes


def test_model_and_vae_axes_are_labelled_by_file_name():
    assert grid.parse_axis("model=/m/sd15/,other").labels() == ["sd15", "other"]
    assert grid.parse_axis(r"vae=None,C:\\vaes\\x.safetensors").labels() == ["None", "x.safetensors"]


def test_a_hires_axis_turns_the_hires_fix_on_and_keeps_the_other_settings(tiny_sd, no_model_load):
    from t2i.pipelines.hires import Hires

    axes = [grid.parse_axis("hires-scale=1.5,2"), grid.parse_axis("Denoising=0.4,0.6", "--y")]
    cells = grid.plan(jobs.Request(["a"], model=str(tiny_sd), steps=2), axes)
    assert [(c.job.hires.scale, c.job.hires.denoise) for c in cells] == [(1.5, 0.4), (2.0, 0.4), (1.5, 0.6),
                                                                          (2.0, 0.6)]
    base = jobs.Request(["a"], model=str(tiny_sd), hires=Hires(scale=3, steps=4, upscaler="nearest"))
    (cell,) = grid.plan(base, [grid.parse_axis("Hires upscaler=Latent (bicubic)")])
    assert (cell.job.hires.scale, cell.job.hires.steps, cell.job.hires.upscaler) == (3, 4, "latent-bicubic")
    (cell,) = grid.plan(jobs.Request(["a"], model=str(tiny_sd)), [grid.parse_axis("vae=Automatic")])
    assert cell.job.vae is None  # A1111's Automatic/None: the model's own


@pytest.mark.parametrize("spec, words", [
    ("hires-denoise=0.5,1.5", "--x hires-denoise value 1.5: hires denoising strength must be in (0, 1]"),
    ("hires-upscaler=latent,ESRGAN_4x", "--x hires-upscaler value 'ESRGAN_4x': unknown hires upscaler"),
    ("hires-scale=2,0", "--x hires-scale value 0.0: hires scale must be a number above 0"),
    ("vae=None,nope", "--x vae value 'nope'"),
    ("model=MISSING", "--x model value"),
])
def test_bad_model_vae_and_hires_values_are_one_line_before_loading(tiny_sd, no_model_load, tmp_path, spec, words):
    spec = spec.replace("MISSING", str(tmp_path / "no-such-model"))
    with pytest.raises(UsageError, match=re.escape(words)) as err:
        grid.plan(jobs.Request(["a red circle"], model=str(tiny_sd)), [grid.parse_axis(spec)])
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def second_model(tiny_sd, tmp_path_factory):
    """A copy of the tiny SD model with other UNet weights (another checkpoint), and a VAE unlike its own."""
    import shutil

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("grid-models")
    other = Path(shutil.copytree(tiny_sd, root / "second-sd"))
    (weights,) = (other / "unet").glob("*.safetensors")
    torch.manual_seed(3)
    save_file({k: v + torch.randn_like(v) * 0.05 for k, v in load_file(str(weights)).items()}, str(weights))
    vae = AutoencoderKL.from_pretrained(str(tiny_sd / "vae"))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae.save_pretrained(str(root / "vaes" / "warm-vae"))
    return other, root / "vaes"


def test_a_checkpoint_and_a_vae_axis_run_each_model_once_and_record_what_ran(run_cli, tiny_sd, second_model,
                                                                              tmp_path, monkeypatch):
    from t2i.reproduce import reproduce

    other, vae_dir = second_model
    loads = []
    real = jobs.load
    monkeypatch.setattr(jobs, "load", lambda job: loads.append(job.request.model) or real(job))
    code, stdout, stderr = run_cli("grid", "a red circle", "--x", f"model={tiny_sd},{other}", "--y",
                                   "VAE=None,warm-vae", "--vae-dir", vae_dir, "--seed", 5, "--steps", 1,
                                   "--out", tmp_path, "-q")
    assert code == 0, stderr
    assert loads == [str(tiny_sd), str(other)]  # model is the fastest axis, yet each loads once
    by_cell = {}
    for path in stdout.split()[:4]:
        _, s = metadata.read(path)
        by_cell[(s.model_name, s.vae_name)] = np.asarray(Image.open(path).convert("RGB"), dtype=int)
        assert s.model in (str(tiny_sd), str(other)) and (s.vae_name == "") == (s.vae == "")
    assert set(by_cell) == {(tiny_sd.name, ""), (other.name, ""), (tiny_sd.name, "warm-vae"),
                            (other.name, "warm-vae")}
    assert np.abs(by_cell[(tiny_sd.name, "")] - by_cell[(other.name, "")]).max() > 0  # another checkpoint ran
    assert np.abs(by_cell[(other.name, "")] - by_cell[(other.name, "warm-vae")]).max() > 0  # another VAE
    fields = metadata.parse_a1111(metadata.read(stdout.split()[-1])[0])
    assert (fields["X Type"], fields["Y Type"]) == ("Checkpoint name", "VAE")
    last = stdout.split()[3]  # printed as made, each model's cells together: the second model, the other VAE
    assert (metadata.read(last)[1].model_name, metadata.read(last)[1].vae_name) == (other.name, "warm-vae")
    assert reproduce(last, progress=False).identical


def test_hires_axes_make_each_cell_at_its_size_with_its_settings(run_cli, tiny_sd, tmp_path):
    code, stdout, stderr = run_cli("grid", "a red circle", "--x", "Hires upscale=1,2", "--y", "Denoising=0.5,1",
                                   "--hires-steps", 1, "--seed", 2, "--steps", 1, "--model", tiny_sd,
                                   "--out", tmp_path, "-q")
    assert code == 0, stderr
    made = [(Image.open(p).size, metadata.read(p)[1]) for p in stdout.split()[:4]]
    assert [(size, s.hires_scale, s.hires_denoise, s.hires_steps, s.width) for size, s in made] == [
        ((32, 32), 1, 0.5, 1, 32), ((64, 64), 2, 0.5, 1, 32), ((32, 32), 1, 1, 1, 32), ((64, 64), 2, 1, 1, 32)]
    grid_image = Image.open(stdout.split()[-1])
    assert grid_image.width > 2 * 64 and grid_image.height > 2 * 64  # cells as large as the largest


@pytest.mark.parametrize("axis, words", [
    ("vae=None,nope", "--x vae value 'nope'"),
    ("Checkpoint name=/no/such/model", "--x model value '/no/such/model'"),
    ("Denoising=0", "--x hires-denoise value 0.0"),
])
def test_bad_grid_axes_exit_2_in_one_line_before_loading(run_cli, no_model_load, tiny_sd, tmp_path, axis, words):
    from helpers import one_line

    code, _, stderr = run_cli("grid", "a red circle", "--model", tiny_sd, "--x", axis, "--out", tmp_path)
    assert code == 2 and words in one_line(stderr) and "Traceback" not in stderr
