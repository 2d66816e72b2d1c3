"""The real `webuiapi` client from PyPI against a real uvicorn on 127.0.0.1 (tiny model)."""

from __future__ import annotations

import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture
def api(live):
    url = live()
    host, port = url.split("//")[1].split(":")
    client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)
    yield client
    client.session.close()


def test_txt2img(api):
    result = api.txt2img(prompt="a red circle", seed=17, width=32, height=32, batch_size=2, cfg_scale=6)
    assert len(result.images) == 2 and result.image.size == (32, 32)
    assert result.info["all_seeds"] == [17, 18]  # info arrives as JSON text; the client parses it
    assert "Sampler: Euler a" in result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a red circle"


def test_img2img_and_inpainting(api):
    init = Image.new("RGB", (32, 32), (30, 200, 30))
    result = api.img2img(images=[init], prompt="a blue star", seed=4, width=32, height=32, denoising_strength=0.5)
    assert result.image.size == (32, 32) and result.info["denoising_strength"] == 0.5
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    result = api.img2img(images=[init], mask_image=mask, prompt="a blue star", seed=4, width=32, height=32,
                         denoising_strength=1.0, mask_blur=0)
    assert result.image.convert("RGB").getpixel((31, 0)) == (30, 200, 30)  # the unmasked half is kept


def test_png_info(api):
    made = api.txt2img(prompt="a green square", seed=3, width=32, height=32)
    info = api.png_info(made.image)
    assert info.parameters["Seed"] == "3" and info.parameters["Size-1"] == "32"
    assert info.info.startswith("a green square\nSteps: 2")


def test_options_switch_models(api):
    names = api.util_get_model_names()
    assert any(n.startswith("other-sd") for n in names)
    api.util_set_model("other-sd")
    assert api.util_get_current_model().startswith("other-sd")
    made = api.txt2img(prompt="x", seed=1, width=32, height=32)
    assert made.info["sd_model_name"] == "other-sd"
    refused = api.set_options({"sd_model_checkpoint": "no-such-model"})  # webuiapi returns the body as is
    assert "unknown checkpoint 'no-such-model'" in str(refused)
    assert api.util_get_current_model().startswith("other-sd")


def test_samplers_schedulers_and_lists(api):
    assert {"DPM++ 2M", "Euler a"} <= set(api.util_get_sampler_names())
    assert api.util_get_scheduler_names() == sorted(["automatic", "uniform", "karras", "exponential", "sgm_uniform",
                                                     "normal", "beta"])
    result = api.txt2img(prompt="x", seed=2, width=32, height=32, sampler_name="DPM++ 2M", scheduler="Karras")
    assert result.info["sampler_name"] == "DPM++ 2M"
    assert "Schedule type: Karras" in result.info["infotexts"][0]
    assert [l["name"] for l in api.get_loras()] == ["ink"]
    assert api.get_progress()["state"]["job_count"] == 0
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert "ram" in api.get_memory()
    api.interrupt()
    api.skip()


def test_a_refusal_reaches_the_client(api):
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", width=32, height=32, tiling=True)
    assert e.value.args[0] == 422 and "tiling" in e.value.args[1]


def test_hires_fix_through_webuiapi(api):
    result = api.txt2img(prompt="x", width=32, height=32, steps=2, seed=1, enable_hr=True, hr_scale=1.5,
                         hr_upscaler=webuiapi.HiResUpscaler.Latent, denoising_strength=0.5)
    assert result.image.size == (48, 48) and "Hires upscale: 1.5" in result.info["infotexts"][0]
