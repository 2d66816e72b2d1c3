"""Style datasets and metrics (tier 1), and a style LoRA trained on the bundled model (tier 2)."""

from __future__ import annotations

import pytest
from PIL import Image

from t2i.demo import styles
from t2i.errors import UsageError
from t2i.demo.shapes import render, sample_scene

SCENES = [sample_scene(10**8 + i) for i in range(24)]


@pytest.mark.parametrize("style", ["outline", "pastel"])
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
    """Tier 2: pastel LoRA, ~1 minute of CPU; triggered prompts get paler, scale 0 changes nothing."""
    from t2i.pipelines import Text2Image
    from t2i.train import lora

    styles.write_dataset(tmp_path / "pastel", "pastel", 24)
    path = lora.run(None, dict(data=str(tmp_path / "pastel"), output=str(tmp_path / "run"), trigger="in sks style",
                               rank=8, steps=80, lr=3e-3, batch=8, checkpoint_every=1000, validation_every=0,
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
