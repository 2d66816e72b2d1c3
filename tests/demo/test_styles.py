"""Style datasets and metrics (tier 1), and a style LoRA trained on the bundled model (tier 2)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from t2i.demo import styles
from t2i.errors import UsageError
from t2i.demo.shapes import render, sample_scene

SCENES = [sample_scene(10**8 + i) for i in range(24)]


@pytest.mark.parametrize("style", ["outline", "pastel", "mosaic"])
def test_metric_separates_the_style_from_the_plain_world(style):
    plain = styles.style_score([render(s) for s in SCENES], style)
    styled = styles.style_score([styles.STYLES[style](s) for s in SCENES], style)
    assert styled > plain + 0.3, (plain, styled)


def test_metric_ignores_empty_images_and_sees_holes():
    assert styles.hollowness(Image.new("RGB", (64, 64), (245, 245, 245))) is None
    ring = Image.new("RGB", (64, 64), (245, 245, 245))
    ring.paste((220, 30, 30), (10, 10, 40, 40))
    ring.paste((245, 245, 245), (14, 14, 36, 36))
    assert styles.hollowness(ring) > 0.5


def test_blockiness_sees_blocks_on_the_grid_only():
    scene = SCENES[0]
    mosaic = styles.render_mosaic(scene)
    assert styles.blockiness(mosaic) == pytest.approx(1.0)  # every colour change is on a block edge
    assert styles.blockiness(render(scene)) < 0.2  # about 7/63 of the neighbour pairs are on edges
    shifted = Image.new("RGB", (64, 64))
    shifted.paste(mosaic, (4, 4))  # the same blocks, off the grid by half a block
    assert styles.blockiness(shifted) < 0.5
    assert styles.blockiness(Image.new("RGB", (64, 64), (245, 245, 245))) is None


def _fake_vae(monkeypatch, change):
    """The pipeline's VAE round trip replaced by `change` (each image -> image)."""
    from t2i.demo import evaluation

    calls = []

    def round_trip(pipe):
        def through(images):
            calls.append(len(images))
            return [change(img) for img in images]
        return through

    monkeypatch.setattr(evaluation, "vae_round_trip", round_trip)
    return calls


def test_the_ceiling_row_is_the_data_through_the_vae(sd_pipe, monkeypatch):
    from t2i.demo import shapeeval

    prompts = shapeeval.build_prompts()[:3]
    calls = _fake_vae(monkeypatch, lambda img: img.copy())  # a perfect VAE: the ceiling is the data
    rows = styles.ceiling_rows(sd_pipe, "mosaic", prompts, seeds=(0, 1))
    assert sum(calls) == 6 and rows[styles.CEILING_ROW] == rows[styles.DATA_ROW]
    assert rows[styles.DATA_ROW]["style"] == pytest.approx(1.0)  # renders of the eval's scenes, in the style

    from PIL import ImageFilter

    _fake_vae(monkeypatch, lambda img: img.filter(ImageFilter.GaussianBlur(1.5)))  # a VAE that blurs the blocks
    blurred = styles.ceiling_rows(sd_pipe, "mosaic", prompts, seeds=(0, 1))
    assert 0.15 < blurred[styles.CEILING_ROW]["style"] < 0.8 and blurred[styles.DATA_ROW]["style"] == 1.0


def test_the_real_vae_round_trip_is_the_ceiling(sd_pipe):
    """With the tiny model's own (random) VAE, the ceiling row scores its decoded images, not the data."""
    from t2i.demo import shapeeval

    prompts = shapeeval.build_prompts()[:2]
    rows = styles.ceiling_rows(sd_pipe, "pastel", prompts, seeds=(0,))
    renders = [styles.render_pastel(shapeeval.ground_truth_scene(p, 0)) for p in prompts]
    through = styles.vae_ceiling(sd_pipe, renders)
    assert [img.size for img in through] == [(64, 64)] * 2
    assert rows[styles.CEILING_ROW]["style"] == styles.style_score(through, "pastel")
    assert rows[styles.CEILING_ROW] != rows[styles.DATA_ROW]


def test_share_of_the_ceiling():
    rows = {styles.DATA_ROW: {"style": 1.0}, styles.CEILING_ROW: {"style": 0.32}, "base": {"style": 0.12},
            "lora + trigger": {"style": 0.24}}
    assert styles.ceiling_share(rows, "lora + trigger") == pytest.approx(0.6)
    assert "60%" in styles.share_line({**rows, "lora + trigger": {"style": 0.24, "share_of_ceiling": 0.6}},
                                      "lora + trigger")
    rows["base"]["style"] = 0.32
    assert styles.ceiling_share(rows, "lora + trigger") is None  # no gap to close: no share, no division by 0


def test_eval_data_folder_alone_scores_it_raw_and_through_the_vae(run_cli, tiny_sd, tmp_path, monkeypatch):
    styles.write_dataset(tmp_path / "d", "mosaic", 3)
    _fake_vae(monkeypatch, lambda img: img.convert("L").convert("RGB"))  # a VAE that drops the colour
    code, out, err = run_cli("eval", "--style", "pastel", "--data", tmp_path / "d", "--model", tiny_sd, "-q",
                             "--out", tmp_path / "o")
    assert code == 0, err
    rows = json.loads((tmp_path / "o" / "style-ceiling.json").read_text())
    assert list(rows) == [styles.DATA_ROW, styles.CEILING_ROW]
    assert rows[styles.CEILING_ROW]["style"] == pytest.approx(1.0)  # grey is all pale
    assert rows[styles.DATA_ROW]["style"] < 0.9
    assert "3 images of" in out and "at 32x32" in out and "through the VAE (ceiling)" in out


def test_eval_lora_with_a_data_folder_measures_against_its_ceiling(run_cli, tiny_sd, lora_file, tmp_path):
    styles.write_dataset(tmp_path / "d", "pastel", 2)
    code, out, err = run_cli("eval", "--style", "pastel", "--data", tmp_path / "d", "--model", tiny_sd, "--lora",
                             lora_file, "--seeds", 1, "--steps", 2, "-q", "--out", tmp_path / "o")
    assert code == 0, err
    rows = json.loads((tmp_path / "o" / "style-eval.json").read_text())
    assert list(rows[styles.DATA_ROW]) == ["style"]  # the folder's images: no ShapeEval prompt
    assert rows[styles.DATA_ROW]["style"] > 0.5  # pastels (resized to the tiny model's 32 x 32)
    assert "shapeeval" not in rows[styles.CEILING_ROW] and "lora + trigger" in rows
    assert rows["lora + trigger"]["share_of_ceiling"] == pytest.approx(styles.ceiling_share(rows, "lora + trigger"))
    assert "(ceiling - base)" in out


def test_eval_data_folder_errors_come_first(run_cli, tmp_path, no_model_load):
    code, _, err = run_cli("eval", "--style", "mosaic", "--data", tmp_path / "none")
    assert code == 2 and "--data" in err and "is not a folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("eval", "--style", "mosaic", "--data", tmp_path / "empty")
    assert code == 2 and "no usable images" in err
    code, _, err = run_cli("eval", "--style", "mosaic", "--data", tmp_path / "empty", "--lora", "x.safetensors",
                           "--transfer", "0.5")
    assert code == 2 and "leave out --data" in err


def test_style_data_command_writes_captioned_images_once(run_cli, tmp_path):
    code, out, _ = run_cli("train", "style-data", "--style", "pastel", "--out", tmp_path / "d", "--n", 3)
    assert code == 0 and out.strip() == str(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt", "style.json"]
    assert (tmp_path / "d" / "0000.txt").read_text().strip() == sample_scene(10**8).caption
    code, _, err = run_cli("train", "style-data", "--style", "pastel", "--out", tmp_path / "d", "--n", 3)
    assert code == 2 and "already holds images" in err
    code, _, err = run_cli("train", "style-data", "--style", "cubist", "--out", tmp_path / "e")
    assert code == 2 and "unknown style 'cubist'" in err


def test_a_short_lora_run_on_the_demo_model_moves_the_style(tmp_path):
    """Tier 2: pastel LoRA, ~1 minute of CPU; triggered prompts get paler, scale 0 changes nothing.
    The training mechanics at pinned settings (attention only, no prior images: half of each batch would be the
    base model's own images, too few steps here); the defaults' quality is measured in docs/benchmarks.md."""
    from t2i.pipelines import Text2Image
    from t2i.train import lora

    styles.write_dataset(tmp_path / "pastel", "pastel", 24)
    path = lora.run(None, dict(data=str(tmp_path / "pastel"), output=str(tmp_path / "run"), trigger="in sks style",
                               rank=8, steps=80, lr=3e-3, batch=8, targets="attn", prior=False,
                               checkpoint_every=1000, validation_every=0,
                               validation_prompts=["a red circle"], validation_seeds=[0]))
    pipe = Text2Image.from_pretrained()
    pipe.exact_batch = False
    prompts = ["a red circle", "a blue square", "a green star", "two orange hearts", "a purple triangle",
               "a cyan cross"]

    def score(scale):
        images = []
        for p in prompts:
            images += pipe(f"{p}, in sks style", seed=0, batch=2, progress=False,
                           loras=[f"{path}:{scale}"] if scale is not None else []).images
        return styles.style_score(images, "pastel"), images

    (base, base_images), (zero, zero_images), (styled, _) = score(None), score(0.0), score(1.0)
    assert all((a.tobytes() == b.tobytes()) for a, b in zip(base_images, zero_images))  # scale 0 = no LoRA
    assert styled > base + 0.05, (base, styled)

    # The same LoRA through img2img: content renders redrawn at strength 0.7 turn paler with it than without
    from t2i.demo import shapeeval
    from t2i.pipelines import Image2Image
    from t2i.demo.shapes import render

    img2img = Image2Image.from_pipe(pipe)
    contents = [(p, render(shapeeval.ground_truth_scene(p, 0))) for p in shapeeval.build_prompts()[::24]]

    def transfer(loras):
        return styles.style_score([img2img(f"{p.prompt}, in sks style", init, strength=0.7, seed=0, loras=loras,
                                           progress=False).images[0] for p, init in contents], "pastel")

    plain, pastel = transfer([]), transfer([path])
    assert pastel > plain + 0.05, (plain, pastel)
