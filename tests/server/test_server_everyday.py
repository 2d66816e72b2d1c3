"""A1111's everyday set over the API (issue 29): enable_hr and its hr_* fields, clip skip (the clip_skip field
and override_settings' CLIP_stop_at_last_layers), sd_vae with GET /sd-vae (tiny model)."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file, save_file

from helpers import pixels
from srv import FAST, decode

A = "/sdapi/v1"


def txt2img(client, **fields):
    return client.post(f"{A}/txt2img", json={"prompt": "a red circle", "seed": 7, **FAST, **fields})


def _image(r):
    assert r.status_code == 200, r.text
    body = r.json()
    return decode(body["images"][0]), json.loads(body["info"])


def test_enable_hr_makes_the_larger_image_in_a1111_words_and_it_reproduces(client, tmp_path):
    from t2i.reproduce import reproduce

    image, info = _image(txt2img(client, enable_hr=True, hr_scale=2, hr_upscaler="Latent (bicubic)",
                                 hr_second_pass_steps=3, denoising_strength=0.6))
    assert image.size == (64, 64)
    text = info["infotexts"][0]
    for words in ("Size: 32x32", "Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Latent (bicubic)",
                  "Denoising strength: 0.6"):
        assert words in text, text
    assert info["denoising_strength"] == 0.6
    path = tmp_path / "hr.png"
    image.save(path, pnginfo=_pnginfo(image))
    assert reproduce(path, progress=False).identical


def _pnginfo(image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in image.text.items():
        info.add_text(k, v)
    return info


def test_hr_resize_and_lists_of_upscalers(client):
    image, info = _image(txt2img(client, enable_hr=True, hr_resize_x=48, hr_resize_y=40, hr_upscaler="Lanczos"))
    assert image.size == (48, 40) and "Hires resize: 48x40" in info["infotexts"][0]
    assert "Latent (nearest-exact)" in {m["name"] for m in client.get(f"{A}/latent-upscale-modes").json()}
    assert {"None", "Lanczos", "Nearest"} == {u["name"] for u in client.get(f"{A}/upscalers").json()}


@pytest.mark.parametrize("fields, field", [
    ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
    ({"hr_scale": 0}, "hr_scale"),
    ({"denoising_strength": 1.5}, "denoising_strength"),
    ({"hr_scale": 200}, "hr_scale"),  # over the server's side limit
    ({"hr_sampler_name": "Euler a", "sampler_name": "DPM++ 2M Karras"}, "hr_sampler_name"),
    ({"hr_prompt": "another prompt"}, "hr_prompt"),
    ({"hr_checkpoint_name": "other-sd"}, "hr_checkpoint_name"),
    ({"firstpass_image": "abc"}, "firstpass_image"),
])
def test_hires_fields_t2i_cannot_honour_are_422s_naming_them(client, fields, field):
    r = txt2img(client, enable_hr=True, **fields)
    assert r.status_code in (413, 422), r.text
    assert field in r.text


def test_hr_fields_are_ignored_without_enable_hr_as_in_a1111(client):
    assert txt2img(client, hr_prompt="another", hr_sampler_name="Euler a", hr_upscaler="ESRGAN_4x").status_code == 200


def test_clip_skip_as_field_and_override_setting(client):
    plain, info = _image(txt2img(client))
    assert info["clip_skip"] == 1 and "Clip skip" not in info["infotexts"][0]
    by_option, info = _image(txt2img(client, override_settings={"CLIP_stop_at_last_layers": 2}))
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    by_field, _ = _image(txt2img(client, clip_skip=2))
    assert (pixels(plain) != pixels(by_option)).any() and (pixels(by_field) == pixels(by_option)).all()
    r = txt2img(client, override_settings={"CLIP_stop_at_last_layers": 3})
    assert r.status_code == 422 and "beyond" in r.text  # the tiny encoder has 2 layers
    assert client.get(f"{A}/options").json()["CLIP_stop_at_last_layers"] == 1  # a request's override stays its own


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, tiny_sd):
    import torch

    folder = tmp_path_factory.mktemp("vaes")
    state = load_file(str(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(3)
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}, str(folder / "sharp.safetensors"))
    return folder


def test_sd_vae_lists_vae_dir_and_override_settings_uses_it(make_client, vae_dir, model_dir):
    client = make_client(vae_dir=vae_dir, model_dir=model_dir)
    assert client.get(f"{A}/sd-vae").json() == [{"model_name": "sharp.safetensors", "filename": "sharp.safetensors"}]
    own, info = _image(txt2img(client, override_settings={"sd_vae": "Automatic"}))
    assert info["sd_vae_name"] is None and "VAE" not in info["infotexts"][0]
    other, info = _image(txt2img(client, override_settings={"sd_vae": "sharp.safetensors"}))
    sha = hashlib.sha256((vae_dir / "sharp.safetensors").read_bytes()).hexdigest()[:10]
    assert info["sd_vae_name"] == "sharp.safetensors" and info["sd_vae_hash"] == sha
    assert f"VAE hash: {sha}, VAE: sharp.safetensors" in info["infotexts"][0]
    assert (pixels(own) != pixels(other)).any()
    again, _ = _image(txt2img(client))  # the next request decodes with the model's own VAE again
    assert (pixels(again) == pixels(own)).all()
    r = txt2img(client, override_settings={"sd_vae": "missing.safetensors"})
    assert r.status_code == 404 and "sd-vae" in r.text
