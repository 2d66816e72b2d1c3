"""An API request and the matching `t2i generate` give the same pixels and the same PNG metadata,
and `t2i reproduce` replays a PNG the server made."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from srv import png_b64

A = "/sdapi/v1"


def chunks(data: bytes) -> tuple[bytes, str, dict]:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes(), im.text["parameters"], json.loads(im.text["t2i"])


def test_txt2img_equals_t2i_generate(make_client, run_cli, tiny_sd, tmp_path):
    code, out, err = run_cli("generate", "a red circle, (blue:1.2)", "--model", tiny_sd, "--device", "cpu",
                             "--seed", 5, "--steps", 3, "-W", 32, "-H", 40, "--sampler", "Euler a", "--cfg", 6.5,
                             "--negative-prompt", "green", "--batch", 2, "--out", tmp_path / "cli", "--quiet")
    assert code == 0, err
    cli = [chunks(open(p, "rb").read()) for p in out.split()]
    c = make_client(out=tmp_path / "served")
    r = c.post(f"{A}/txt2img", json={"prompt": "a red circle, (blue:1.2)", "negative_prompt": "green", "seed": 5,
                                     "steps": 3, "width": 32, "height": 40, "sampler_name": "Euler a",
                                     "cfg_scale": 6.5, "batch_size": 2})
    assert r.status_code == 200, r.text
    api = [chunks(base64.b64decode(b)) for b in r.json()["images"]]
    assert api == cli  # pixels, A1111 text and t2i JSON, image for image
    saved = sorted((tmp_path / "served").iterdir())
    assert [chunks(p.read_bytes()) for p in saved] == cli
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == [p.name for p in saved]


def test_n_iter_equals_one_batch_of_the_cli(make_client, run_cli, tiny_sd, tmp_path):
    """A1111's n_iter x batch_size: image i has seed + i, the pixels of the CLI's batch image i (bit for bit on the
    exact path, `t2i serve --speed exact`; `auto` batches the UNet, and a batch of 4 then equals two of 2 only to
    within rounding)."""
    code, out, err = run_cli("generate", "a star", "--model", tiny_sd, "--device", "cpu", "--seed", 11, "--steps", 2,
                             "-W", 32, "-H", 32, "--batch", 4, "--speed", "exact", "--out", tmp_path, "--quiet")
    assert code == 0, err
    cli = [chunks(open(p, "rb").read())[0] for p in out.split()]
    r = make_client(speed="exact").post(f"{A}/txt2img", json={"prompt": "a star", "seed": 11, "steps": 2,
                                                              "width": 32, "height": 32, "batch_size": 2, "n_iter": 2})
    assert [chunks(base64.b64decode(b))[0] for b in r.json()["images"]] == cli


def test_the_servers_speed_mode_runs_as_t2i_generate_with_that_speed(make_client, run_cli, tiny_sd, tmp_path):
    """`t2i serve --speed cache2` (ServerConfig.speed): every job runs as `t2i generate --speed cache2`, which
    changes the pixels, and the PNG records it; the default server runs `auto` as the CLI's default does."""
    args = ["a red circle", "--model", tiny_sd, "--device", "cpu", "--seed", 3, "--steps", 6, "-W", 32, "-H", 32]
    body = {"prompt": "a red circle", "seed": 3, "steps": 6, "width": 32, "height": 32}
    made = {}
    for speed in ("cache2", "auto"):
        code, out, err = run_cli("generate", *args, "--speed", speed, "--out", tmp_path / speed, "--quiet")
        assert code == 0, err
        r = make_client(speed=speed).post(f"{A}/txt2img", json=body)
        assert r.status_code == 200, r.text
        made[speed] = chunks(base64.b64decode(r.json()["images"][0]))
        assert made[speed] == chunks(open(out.strip(), "rb").read())
    assert made["cache2"][0] != made["auto"][0]  # feature caching changes the image: the mode reached the UNet
    assert "cache2" in made["cache2"][2]["speed"] and "cache2" not in made["auto"][2]["speed"]


@pytest.mark.parametrize("masked", [False, True])
def test_img2img_and_inpaint_equal_the_cli(make_client, run_cli, tiny_sd, tmp_path, masked):
    init = Image.effect_noise((32, 32), 60).convert("RGB")
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (4, 4, 20, 28))
    mask.save(tmp_path / "mask.png")
    command = ["inpaint" if masked else "img2img", "a blue star", "--init", tmp_path / "init.png", "--model",
               tiny_sd, "--device", "cpu", "--seed", 2, "--steps", 4, "--strength", 0.6, "--out", tmp_path / "cli",
               "--quiet"]
    body = {"prompt": "a blue star", "init_images": [png_b64(init)], "seed": 2, "steps": 4,
            "denoising_strength": 0.6}
    if masked:
        command += ["--mask", tmp_path / "mask.png", "--mask-blur", 2]
        body |= {"mask": png_b64(mask), "mask_blur": 2}
    code, out, err = run_cli(*command)
    assert code == 0, err
    pixels, text, settings = chunks(open(out.strip(), "rb").read())
    r = make_client().post(f"{A}/img2img", json=body)
    assert r.status_code == 200, r.text
    api_pixels, api_text, api_settings = chunks(base64.b64decode(r.json()["images"][0]))
    assert api_pixels == pixels and api_text == text
    # the same settings, but for where the inputs were: a file for the CLI, the request for the server
    for key in ("init_image", "mask_image"):
        settings.pop(key), api_settings.pop(key)
    assert api_settings == settings


def test_t2i_reproduce_replays_a_server_png(make_client, run_cli, tmp_path):
    c = make_client()
    r = c.post(f"{A}/txt2img", json={"prompt": "a red circle", "seed": 9, "steps": 2, "width": 32, "height": 32,
                                     "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    path = tmp_path / "served.png"
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    code, out, err = run_cli("reproduce", path, "--quiet")
    assert code == 0, out + err
    assert "reproduced bit for bit" in out
    init = tmp_path / "init.png"
    Image.effect_noise((32, 32), 40).convert("RGB").save(init)
    r = c.post(f"{A}/img2img", json={"prompt": "x", "init_images": [png_b64(Image.open(init))], "seed": 1,
                                     "steps": 4})
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    code, out, err = run_cli("reproduce", path, "--init", init, "--quiet")
    assert code == 0 and "bit for bit" in out, out + err


def test_bundled_model_matches_the_cli(make_client, run_cli, tmp_path):
    """The default model (its autoguidance on) through the API and through `t2i generate`."""
    code, out, err = run_cli("generate", "a red circle", "--seed", 3, "--steps", 2, "--device", "cpu",
                             "--out", tmp_path, "--quiet")
    assert code == 0, err
    c = make_client(model=None)
    r = c.post(f"{A}/txt2img", json={"prompt": "a red circle", "seed": 3, "steps": 2})
    assert r.status_code == 200, r.text
    assert chunks(base64.b64decode(r.json()["images"][0])) == chunks(open(out.strip(), "rb").read())
    assert "Autoguidance" in json.loads(r.json()["info"])["infotexts"][0]
