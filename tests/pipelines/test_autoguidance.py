"""Autoguidance: a model folder's guide/ UNet steers the late steps (pipelines.unet_calls.autoguided_unet)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i import metadata
from t2i.errors import ModelLoadError, UsageError
from t2i.settings import Settings


def add_guide(folder: Path, seed: int = 1, **changes) -> Path:
    """A smaller random UNet as folder/guide, and t2i.json defaults that turn autoguidance on."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[8, 16],
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8) | changes
    UNet2DConditionModel(**config).save_pretrained(str(folder / "guide"), safe_serialization=True)
    (folder / "t2i.json").write_text(json.dumps({"steps": 4, "autoguidance": 3.0, "autoguidance_below": 500}))
    return folder


@pytest.fixture(scope="module")
def guided(tmp_path_factory, tiny_sd) -> Path:
    return add_guide(Path(shutil.copytree(tiny_sd, tmp_path_factory.mktemp("models") / "guided")))


@pytest.fixture(scope="module")
def guided_pipe(guided):
    from t2i.pipelines import Text2Image

    return Text2Image.from_pretrained(str(guided), device="cpu", dtype="fp32")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------- the arithmetic


class _Plain(torch.nn.Module):
    """A stand-in UNet whose rows differ by their text: sample + mean of the row's embedding. `rows`: the rows of
    each call."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.rows.append(sample.shape[0])
        return (sample + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None],)


class _Weak(torch.nn.Module):
    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        return (0.5 * sample - encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None],)


@pytest.mark.parametrize("exact", [False, True])
def test_the_pipelines_sum_becomes_the_autoguided_prediction_below_the_threshold(exact):
    from t2i.pipelines.unet_calls import autoguided_unet

    unet, weak, n, g, s = _Plain(), _Weak(), 2, 5.0, 3.0
    settings = Settings(prompt="p", guidance=g, autoguidance=s, autoguidance_below=500)
    sample, text = torch.randn(2 * n, 4, 8, 8), torch.randn(2 * n, 7, 32)
    plain = unet(sample, torch.tensor(100), text)[0]
    unet.rows.clear()
    with autoguided_unet(unet, weak, settings, n, exact):
        late = unet(sample, torch.tensor(100), text, return_dict=False)[0]
        early = unet(sample, torch.tensor(700), text, return_dict=False)[0]
    assert "forward" not in unet.__dict__  # the class's forward is back
    assert unet.rows == [n, 2 * n]  # an autoguided step needs no unconditional row: the UNet sees the cond rows
    cond, guide = plain[n:], weak(sample[n:], None, text[n:])[0]
    combined = late[:n] + g * (late[n:] - late[:n])  # what StableDiffusionPipeline does with the two rows
    torch.testing.assert_close(combined, cond + (s - 1) * (cond - guide))
    torch.testing.assert_close(late[n:], cond)
    assert torch.equal(early, plain)  # high-noise steps keep classifier-free guidance


# ---------------------------------------------------------------------------- through the pipeline


def test_a_model_with_a_guide_uses_it_by_default_and_records_it(guided_pipe, guided, tmp_path):
    assert guided_pipe.guide is not None and guided_pipe.autoguidance == 3.0
    guided_result = guided_pipe("a red circle", seed=3, progress=False)
    s = guided_result.settings[0]
    assert (s.autoguidance, s.autoguidance_below) == (3.0, 500)
    guided_pipe.autoguidance = 0
    try:
        plain = guided_pipe("a red circle", seed=3, progress=False)
    finally:
        guided_pipe.autoguidance = 3.0
    assert plain.settings[0].autoguidance == 0 and plain.settings[0].autoguidance_below == 0
    assert not np.array_equal(pixels(guided_result.images[0]), pixels(plain.images[0]))
    path = guided_result.save(tmp_path / "guided.png")[0]
    text, settings = metadata.read(path)
    assert "Autoguidance: 3, Autoguidance below: 500" in text
    assert settings.autoguidance == 3.0


def test_a_batch_equals_its_single_runs_with_autoguidance(guided_pipe):
    from t2i import speed

    with speed.apply(guided_pipe, speed.SpeedOptions.parse("exact")):  # auto batches the UNet: within rounding
        batch = guided_pipe("two blue stars", seed=5, batch=2, progress=False)
        single = guided_pipe("two blue stars", seed=6, progress=False)
    assert batch.settings[1].autoguidance == 3.0
    assert np.array_equal(pixels(batch.images[1]), pixels(single.images[0]))


def test_reproduce_replays_autoguidance(run_cli, guided, tiny_sd, tmp_path):
    code, stdout, _ = run_cli("generate", "a green square", "--model", guided, "--seed", 2, "--out", tmp_path, "-q")
    assert code == 0
    made = Path(stdout.strip())
    assert metadata.read(made)[1].autoguidance == 3.0
    code, stdout, _ = run_cli("reproduce", made, "-q")
    assert code == 0 and "bit for bit" in stdout
    code, stdout, _ = run_cli("generate", "a green square", "--model", guided, "--seed", 2, "--autoguidance", 0,
                              "--out", tmp_path / "off.png", "-q")
    assert code == 0
    off_text, off = metadata.read(tmp_path / "off.png")
    assert off.autoguidance == 0 and "Autoguidance" not in off_text
    assert not np.array_equal(pixels(Image.open(made)), pixels(Image.open(tmp_path / "off.png")))
    code, _, stderr = run_cli("reproduce", made, "--model", tiny_sd, "-q")  # a model without the guide
    assert code == 2 and "autoguidance" in stderr and "Traceback" not in stderr


def test_autoguidance_is_off_without_classifier_free_guidance_or_with_a_lora(guided_pipe, lora_file):
    assert guided_pipe("a red circle", seed=1, guidance=1.0, progress=False).settings[0].autoguidance == 0
    # the guide does not carry the LoRA: steering away from it would multiply the LoRA's effect
    with_lora = guided_pipe("a red circle", seed=1, loras=[f"{lora_file}:0.5"], progress=False)
    assert with_lora.settings[0].autoguidance == 0
    # a LoRA at scale 0 is no LoRA: autoguidance stays on, and the image is the one without it
    zero = guided_pipe("a red circle", seed=1, loras=[f"{lora_file}:0"], progress=False)
    guided_pipe.loras.activate([])
    plain = guided_pipe("a red circle", seed=1, progress=False)
    assert zero.settings[0].autoguidance == 3.0
    assert np.array_equal(pixels(zero.images[0]), pixels(plain.images[0]))


def test_autoguidance_runs_under_the_feature_cache(guided_pipe):
    from t2i import speed

    with speed.apply(guided_pipe, speed.SpeedOptions.parse("cache2")) as cache:  # it holds one call's rows
        cached = guided_pipe("a red circle", seed=1, progress=False)
    assert cached.settings[0].autoguidance == 3.0 and "cache2" in cached.settings[0].speed
    assert cache.shallow_calls > 0


def test_a_call_that_raises_mid_way_leaves_the_unet_and_the_guide_as_they_were(guided_pipe):
    """Autoguidance, per-image evaluation of the UNet and of the guide, and bf16 are all on when the step
    callback raises in an autoguided step: every wrapper is gone after it, and the next image is the plain one."""
    from t2i import speed
    from t2i.speed.hooks import hook_names

    def state(module):
        return type(module), sorted(module.__dict__), [n for n, m in module.named_modules() if "forward" in m.__dict__]

    unet, guide = guided_pipe.pipe.unet, guided_pipe.guide
    before, plain = (state(unet), state(guide)), guided_pipe("a red circle", seed=1, batch=2, progress=False)

    seen = []

    def interrupt(i):
        if i == 2:  # the third of four steps: below autoguidance_below, so the guide has run
            seen.append((hook_names(unet), hook_names(guide)))
            raise KeyboardInterrupt

    guided_pipe.on_step = interrupt
    try:
        with pytest.raises(KeyboardInterrupt), speed.apply(guided_pipe, speed.SpeedOptions.parse("bf16")):
            guided_pipe("a red circle", seed=1, batch=2, progress=False)
    finally:
        guided_pipe.on_step = None
    assert seen == [(["autoguidance", "per_image", "bf16"], ["per_image"])]
    assert (state(unet), state(guide)) == before
    again = guided_pipe("a red circle", seed=1, batch=2, progress=False)
    assert [a.tobytes() for a in again.images] == [p.tobytes() for p in plain.images]


def test_bench_compares_stock_without_autoguidance_and_prices_it_in_a_row_of_its_own(guided_pipe):
    from t2i import bench

    rows = bench.bench(guided_pipe, steps=3, repeats=1, options=["batched"], stock_bf16=False).rows
    assert [r.name for r in rows] == ["stock diffusers", "t2i", "t2i + autoguidance 3", "t2i auto (batched)",
                                      "t2i + batched"]
    assert rows[1].max_diff == 0 and rows[3].max_diff <= 2 and rows[4].max_diff <= 2  # stock's work, stock's image
    assert rows[2].max_diff > 0 and rows[2].call > 0  # the guide changes the image
    assert guided_pipe.autoguidance == 3.0  # the model's default is back


# ---------------------------------------------------------------------------- refusals


def test_autoguidance_on_a_model_without_a_guide_is_a_usage_error(sd_pipe, run_cli, tiny_sd, tmp_path):
    assert sd_pipe.guide is None and sd_pipe.autoguidance == 0
    with pytest.raises(UsageError, match="guide/"):
        sd_pipe.autoguidance = 2.0
    assert sd_pipe.autoguidance == 0  # unchanged: the next call runs plain classifier-free guidance
    code, stdout, stderr = run_cli("generate", "a", "--model", tiny_sd, "--autoguidance", 2, "--out", tmp_path)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "guide/" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.iterdir())


def test_a_negative_autoguidance_is_refused_before_loading(run_cli, no_model_load, tmp_path):
    code, _, stderr = run_cli("generate", "a", "--autoguidance", -1, "--out", tmp_path)
    assert code == 2 and "autoguidance" in stderr and "Traceback" not in stderr


def test_a_guide_that_reads_other_latents_is_refused_at_load(sd_copy):
    from t2i.pipelines import Text2Image

    add_guide(sd_copy, in_channels=8)
    with pytest.raises(ModelLoadError, match="in_channels"):
        Text2Image.from_pretrained(str(sd_copy), device="cpu", dtype="fp32")


def test_stock_diffusers_loads_a_model_with_a_guide(guided):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(guided), safety_checker=None, requires_safety_checker=False)
    assert not hasattr(pipe, "guide")
