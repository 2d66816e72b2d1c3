"""Raw HTTP against the app: every A1111 route, t2i's and OpenAI's, and their error paths (tiny model)."""

from __future__ import annotations

import base64
import json

import pytest
from PIL import Image

from srv import FAST, decode, png_b64

A = "/sdapi/v1"


def txt2img(client, **fields):
    return client.post(f"{A}/txt2img", json={"prompt": "a red circle", "seed": 7, **FAST, **fields})


def test_txt2img_answers_in_a1111_shape(client):
    r = txt2img(client, batch_size=2, n_iter=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 4
    info = json.loads(body["info"])  # a JSON string, as clients parse it
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8, 9, 10]
    assert len(info["infotexts"]) == 4 and "Seed: 8" in info["infotexts"][1]
    assert info["task_id"].startswith("task(")
    assert body["parameters"]["prompt"] == "a red circle" and body["parameters"]["batch_size"] == 2
    image = decode(body["images"][1])
    assert image.size == (32, 32)
    assert "Seed: 8" in image.text["parameters"] and json.loads(image.text["t2i"])["seed"] == 8


def test_unknown_fields_and_nulls_are_accepted(client):
    r = txt2img(client, some_extension={"x": 1}, hr_upscaler=None, styles=None, eta=None, comments=None,
                sampler_index="Euler", alwayson_scripts={}, script_args=[])
    assert r.status_code == 200, r.text


def test_webuiapi_style_defaults_are_accepted(client):
    """What webuiapi sends when nothing is set: A1111's defaults, and values that mean the same."""
    r = txt2img(client, enable_hr=False, denoising_strength=0.7, hr_scale=2, hr_upscaler="Latent", styles=[],
                subseed=-1, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0, sampler_name="Euler a",
                scheduler="automatic", restore_faces=False, tiling=False, eta=1.0, s_churn=0, s_tmax=0, s_tmin=0,
                s_noise=1, override_settings={}, override_settings_restore_afterwards=True, send_images=True,
                save_images=False)
    assert r.status_code == 200, r.text


def test_sillytavern_style_request(client):
    """What SillyTavern sends: many fields, override_settings with its clip skip and VAE at their defaults."""
    r = txt2img(client, sampler_name="Euler a", scheduler="Automatic", restore_faces=False, enable_hr=False,
                hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=0, denoising_strength=0.7, clip_skip=1,
                override_settings={"CLIP_stop_at_last_layers": 1, "sd_vae": "None"},
                override_settings_restore_afterwards=True, save_images=False, send_images=True,
                do_not_save_grid=False, do_not_save_samples=False)
    assert r.status_code == 200, r.text
    assert client.get(f"{A}/progress").json()["state"]["job_count"] == 0  # it polls until this is 0


def test_send_images_false(client):
    r = txt2img(client, send_images=False)
    assert r.status_code == 200 and r.json()["images"] == []


@pytest.mark.parametrize("field, value", [
    ("firstpass_image", "abc"), ("restore_faces", True), ("tiling", True), ("styles", ["anime"]),
    ("subseed_strength", 0.5), ("script_name", "x/y/z plot"), ("s_churn", 0.3),
    ("refiner_checkpoint", "sdxl-refiner"), ("alwayson_scripts", {"ControlNet": {"args": [{}]}}),
])
def test_unsupported_field_is_a_422_naming_it(client, field, value):
    r = txt2img(client, **{field: value})
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", field] and field in detail["msg"]


def test_an_unknown_override_setting_is_refused(client):
    r = txt2img(client, override_settings={"eta_noise_seed_delta": 31337})
    assert r.status_code == 422 and "eta_noise_seed_delta" in r.text
    assert txt2img(client, override_settings={"CLIP_stop_at_last_layers": 1}).status_code == 200


@pytest.mark.parametrize("field, value", [("steps", "many"), ("width", [1]), ("seed", "abc"), ("cfg_scale", {})])
def test_bad_type_is_a_422_naming_the_field(client, field, value):
    r = txt2img(client, **{field: value})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("fields, named", [
    ({"width": 33}, "width"), ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 17}, "batch_size"), ({"width": 4096}, "width"), ({"cfg_scale": -1}, "cfg_scale"),
    ({"seed": -5}, "seed"), ({"sampler_name": "Nonexistent"}, "sampler_name"), ({"scheduler": "Polyexponential"}, "scheduler"),
])
def test_bad_values_are_refused_before_queueing(client, fields, named):
    r = txt2img(client, **fields)
    assert 400 <= r.status_code < 500
    assert named in json.dumps(r.json())


def test_the_budget_refuses_before_compute(make_client):
    from t2i.server import Limits

    c = make_client(limits=Limits(max_pixel_steps=32 * 32 * 2 * 2))
    assert txt2img(c, batch_size=2).status_code == 200
    r = txt2img(c, batch_size=3)
    assert r.status_code == 413 and "budget" in r.text


def test_body_size_cap(make_client):
    from t2i.server import Limits

    c = make_client(limits=Limits(max_body=1000))
    r = c.post(f"{A}/txt2img", json={"prompt": "x" * 2000})
    assert r.status_code == 413


def test_sampler_and_scheduler_combine_like_a1111_19(client):
    a = json.loads(txt2img(client, sampler_name="DPM++ 2M", scheduler="Karras").json()["info"])
    b = json.loads(txt2img(client, sampler_name="DPM++ 2M Karras").json()["info"])
    c = json.loads(txt2img(client, sampler_name="DPM++ 2M Karras", scheduler="Automatic").json()["info"])
    # A1111 1.9+: the sampler apart, the schedule that ran in the infotext and extra_generation_params
    assert a["sampler_name"] == b["sampler_name"] == c["sampler_name"] == "DPM++ 2M"
    assert a["infotexts"] == b["infotexts"] == c["infotexts"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in a["infotexts"][0]
    assert a["extra_generation_params"] == {"Schedule type": "Karras"}
    automatic = json.loads(txt2img(client, sampler_name="DPM++ 2M", scheduler="automatic").json()["info"])
    assert automatic["infotexts"] == a["infotexts"]  # DPM++ 2M's automatic schedule is Karras, as in A1111 1.9+
    uniform = json.loads(txt2img(client, sampler_name="DPM++ 2M", scheduler="Uniform").json()["info"])
    assert "Sampler: DPM++ 2M, Schedule type: Uniform," in uniform["infotexts"][0]
    sgm = json.loads(txt2img(client, sampler_name="Euler", scheduler="sgm_uniform").json()["info"])
    assert "Sampler: Euler, Schedule type: SGM Uniform," in sgm["infotexts"][0]
    for fields, named in [({"sampler_name": "Euler a", "scheduler": "Karras"}, "scheduler"),
                          ({"sampler_name": "Euler", "scheduler": "Align Your Steps"}, "scheduler"),
                          ({"sampler_name": "Euler", "scheduler": "nope"}, "scheduler"),
                          ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
                          ({"sampler_name": "DPM++ 9M"}, "sampler_name")]:
        r = txt2img(client, **fields)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", named], (fields, r.text)


def test_lora_by_name_from_the_lora_dir(client):
    plain = txt2img(client).json()
    inked = txt2img(client, prompt="a red circle <lora:ink:1>").json()
    assert "<lora:ink:1>" in json.loads(inked["info"])["infotexts"][0]  # A1111 keeps the tag in the prompt
    assert decode(plain["images"][0]).tobytes() != decode(inked["images"][0]).tobytes()


@pytest.mark.parametrize("name", ["missing", "../ink", "/etc/passwd", "notes"])
def test_lora_names_never_reach_the_file_system(client, name):
    r = txt2img(client, prompt=f"x <lora:{name}:1>")
    assert r.status_code == 422 and "unknown LoRA" in r.text


def test_img2img_and_data_urls(client):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    for encoded in (png_b64(init), "data:image/png;base64," + png_b64(init)):
        r = client.post(f"{A}/img2img", json={"prompt": "a blue star", "init_images": [encoded], "seed": 3,
                                               "steps": 4, "denoising_strength": 0.5})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["denoising_strength"] == 0.5
        assert r.json()["parameters"]["init_images"] is None  # A1111 does not echo them back
        assert not r.json()["images"][0].startswith("data:")


def test_img2img_limits_count_the_init_images_size(client):
    big = png_b64(Image.new("RGB", (2112, 16)))
    r = client.post(f"{A}/img2img", json={"prompt": "x", "init_images": [big], "steps": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]


def test_inpainting_keeps_the_unmasked_pixels(client):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    r = client.post(f"{A}/img2img", json={"prompt": "a blue star", "init_images": [png_b64(init)],
                                          "mask": png_b64(mask), "mask_blur": 0, "seed": 1, "steps": 4,
                                          "denoising_strength": 1.0})
    assert r.status_code == 200, r.text
    out = decode(r.json()["images"][0]).convert("RGB")
    assert out.getpixel((0, 0)) == (200, 30, 30) and out.getpixel((31, 31)) == (200, 30, 30)
    assert json.loads(out.info["t2i"])["pipeline"] == "inpaint"
    inverted = client.post(f"{A}/img2img", json={"prompt": "a blue star", "init_images": [png_b64(init)],
                                                 "mask": png_b64(mask), "mask_blur": 0, "seed": 1, "steps": 4,
                                                 "inpainting_mask_invert": 1, "denoising_strength": 1.0})
    out = decode(inverted.json()["images"][0]).convert("RGB")
    assert out.getpixel((16, 16)) == (200, 30, 30)
    assert "Mask mode: Inpaint not masked" in out.info["parameters"]


@pytest.mark.parametrize("body, named", [
    ({}, "init_images"),
    ({"init_images": ["not base64 at all!"]}, "init_images"),
    ({"init_images": [base64.b64encode(b"GIF89a broken").decode()]}, "init_images"),
    ({"init_images": ["IMG"], "denoising_strength": 0}, "denoising_strength"),
    ({"init_images": ["IMG"], "mask": "BLACK"}, "mask"),
    ({"init_images": ["IMG"], "resize_mode": 1}, "resize_mode"),
    ({"init_images": ["IMG"], "inpainting_fill": 2}, "inpainting_fill"),
])
def test_img2img_errors(client, body, named):
    ok = png_b64(Image.new("RGB", (32, 32)))
    black = png_b64(Image.new("L", (32, 32), 0))
    body = json.loads(json.dumps(body).replace('"IMG"', json.dumps(ok)).replace('"BLACK"', json.dumps(black)))
    r = client.post(f"{A}/img2img", json={"prompt": "x", **FAST, **body})
    assert 400 <= r.status_code < 500, r.text
    assert named in json.dumps(r.json())


def test_png_info_reads_a_server_png(client):
    image = txt2img(client).json()["images"][0]
    r = client.post(f"{A}/png-info", json={"image": "data:image/png;base64," + image})
    assert r.status_code == 200
    body = r.json()
    assert body["info"].startswith("a red circle\n")
    assert body["parameters"]["Seed"] == "7" and body["parameters"]["Size-1"] == "32"
    assert (body["parameters"]["Sampler"], body["parameters"]["Schedule type"]) == ("DPM++ 2M", "Karras")
    made = txt2img(client, sampler_name="DPM++ 2M SDE", scheduler="Beta").json()["images"][0]
    again = client.post(f"{A}/png-info", json={"image": made}).json()["parameters"]
    assert (again["Sampler"], again["Schedule type"]) == ("DPM++ 2M SDE", "Beta")  # round trip
    assert "t2i" in body["items"]
    empty = client.post(f"{A}/png-info", json={"image": png_b64(Image.new("RGB", (8, 8)))}).json()
    assert empty == {"info": "", "items": {}, "parameters": {}}
    assert client.post(f"{A}/png-info", json={"image": "aGVsbG8="}).status_code == 422


def test_lists(client):
    models = client.get(f"{A}/sd-models").json()
    names = {m["model_name"] for m in models}
    assert {"tiny-sd", "other-sd", "t2i-shapes"} <= names and "evil" not in names
    assert all(set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"} for m in models)
    assert all(not m["filename"].startswith("/") for m in models)  # no server paths
    samplers = client.get(f"{A}/samplers").json()
    assert {"DPM++ 2M", "Euler a", "DPM++ 2M SDE"} <= {s["name"] for s in samplers}
    assert "DPM++ 2M Karras" not in {s["name"] for s in samplers}  # A1111 1.9+ lists each sampler once
    assert next(s for s in samplers if s["name"] == "DPM++ 2M")["options"] == {"scheduler": "karras"}
    assert [s["name"] for s in client.get(f"{A}/schedulers").json()] == [
        "automatic", "uniform", "karras", "exponential", "sgm_uniform", "normal", "beta"]
    assert [l["name"] for l in client.get(f"{A}/loras").json()] == ["ink"]
    assert client.get(f"{A}/embeddings").json() == {"skipped": {}, "loaded": {"shiny": {
        "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2}}}
    assert client.get(f"{A}/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get(f"{A}/sd-vae").json() == []  # no --vae-dir (test_server_everyday lists one)
    assert client.get(f"{A}/latent-upscale-modes").json()[0] == {"name": "Latent"}
    assert client.get(f"{A}/upscalers").json()[0]["name"] == "None"
    memory = client.get(f"{A}/memory").json()
    assert memory["ram"]["total"] > 0 and "cuda" in memory
    flags = client.get(f"{A}/cmd-flags").json()
    assert flags["host"] == "127.0.0.1" and flags["api_auth"] is False
    for route in ("refresh-checkpoints", "refresh-loras", "refresh-embeddings"):
        assert client.post(f"{A}/{route}").status_code == 200
    for route in ("script-info", "prompt-styles", "hypernetworks", "face-restorers"):
        assert client.get(f"{A}/{route}").json() == []


def test_options_round_trip_and_switch(make_client, model_dir):
    c = make_client(model_dir=model_dir)
    options = c.get(f"{A}/options").json()
    assert options["sd_model_checkpoint"].startswith("tiny-sd")
    assert c.post(f"{A}/options", json=options).status_code == 200  # Open WebUI posts the whole dict back
    r = c.post(f"{A}/options", json={**options, "sd_model_checkpoint": "other-sd"})
    assert r.status_code == 200, r.text
    assert c.get(f"{A}/options").json()["sd_model_checkpoint"].startswith("other-sd")
    info = json.loads(txt2img(c).json()["info"])
    assert info["sd_model_name"] == "other-sd"
    assert c.post(f"{A}/options", json={"sd_model_checkpoint": "nope.safetensors"}).status_code == 404
    assert c.post(f"{A}/options", json={"sd_model_checkpoint": "../../etc"}).status_code == 404
    assert c.post(f"{A}/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 422
    assert c.post(f"{A}/options", json={"no_such_option": 1}).status_code == 422
    r = txt2img(c, override_settings={"sd_model_checkpoint": "missing"})
    assert r.status_code == 404 and "missing" in r.text


def test_a_broken_checkpoint_fails_its_switch_and_the_server_goes_on(make_client, tmp_path):
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    c = make_client(model_dir=tmp_path / "models")
    r = c.post(f"{A}/options", json={"sd_model_checkpoint": "broken"})
    assert r.status_code == 500 and "not valid JSON" in r.json()["detail"]
    assert c.get(f"{A}/options").json()["sd_model_checkpoint"].startswith("tiny-sd")
    assert txt2img(c).status_code == 200  # the selected checkpoint loads again


def test_progress_when_idle(client):
    body = client.get(f"{A}/progress").json()
    assert body["progress"] == 0 and body["state"]["job_count"] == 0 and body["current_image"] is None
    assert client.get(f"{A}/progress", params={"id_task": "task(nope)"}).status_code == 404


def test_force_task_id_and_progress_by_id(client):
    r = txt2img(client, force_task_id="my-job-1")
    assert json.loads(r.json()["info"])["task_id"] == "my-job-1"
    body = client.get(f"{A}/progress", params={"id_task": "my-job-1"}).json()
    assert body["progress"] == 1.0 and body["state"]["job_count"] == 0 and body["textinfo"] == "done"
    assert client.get("/t2i/v1/jobs/my-job-1").json()["state"] == "done"


def test_interrupt_and_skip_when_idle(client):
    assert client.post(f"{A}/interrupt").json() == {}
    assert client.post(f"{A}/skip").json() == {}


def test_async_jobs(client):
    r = client.post("/t2i/v1/jobs", json={"prompt": "a red circle", "seed": 5, **FAST})
    assert r.status_code == 202
    job = r.json()
    assert job["seed"] == 5
    from srv import wait_until

    wait_until(lambda: client.get(job["status_url"]).json()["state"] == "done")
    result = client.get(job["result_url"]).json()
    assert json.loads(result["info"])["all_seeds"] == [5]
    assert client.post("/t2i/v1/jobs", json={"prompt": "x", "tiling": True}).status_code == 422  # as txt2img
    assert client.post("/t2i/v1/jobs", json={"prompt": "x", "steps": "many"}).json()["detail"][0]["loc"] == [
        "body", "steps"]
    events = client.get(job["events_url"]).text
    assert "event: done" in events and '"state": "done"' in events
    assert client.get("/t2i/v1/jobs/task(none)").status_code == 404
    init = png_b64(Image.new("RGB", (32, 32), (0, 0, 255)))
    r = client.post("/t2i/v1/jobs", json={"prompt": "x", "init_images": [init], "seed": 1, "steps": 4})
    wait_until(lambda: client.get(r.json()["status_url"]).json()["state"] == "done")
    assert json.loads(client.get(r.json()["result_url"]).json()["info"])["denoising_strength"] == 0.75


def test_openai_images(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "size": "32x32", "seed": 3,
                                                     "steps": 2, "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and decode(data[1]["b64_json"]).size == (32, 32)
    assert "Seed: 4" in decode(data[1]["b64_json"]).text["parameters"]
    bad = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
    assert client.post("/v1/images/generations", json={"prompt": "x", "n": 99, "steps": 2}).json()["error"]["param"] == "n"
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "big"}).status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-3"}).status_code == 404
    assert client.post("/v1/images/generations", json={"n": 1}).status_code == 422


def test_page_docs_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/app.js").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # no CDN: works offline
    for asset in ("/docs/files/swagger-ui-bundle.js", "/docs/files/swagger-ui.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/redoc").status_code == 404  # ReDoc would need a CDN
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    assert client.get("/t2i/v1/health").json()["status"] == "ok"
    assert client.get("/static/../app.py").status_code == 404


def test_every_route_needs_the_credentials(make_client):
    c = make_client(api_auth=[("ann", "s3cret"), ("bob", "pw")])
    routes = ["/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json", f"{A}/options", f"{A}/progress",
              f"{A}/sd-models", "/t2i/v1/health", "/t2i/v1/jobs/x"]
    for route in routes:
        r = c.get(route)
        assert r.status_code == 401, route
        assert r.headers["www-authenticate"].startswith("Basic")
    assert c.post(f"{A}/txt2img", json={"prompt": "x"}).status_code == 401
    assert c.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
    assert c.get("/", auth=("ann", "wrong")).status_code == 401
    assert c.get("/", auth=("ann", "s3cret")).status_code == 200
    assert c.get(f"{A}/options", auth=("bob", "pw")).status_code == 200
    assert c.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_save_images_into_out_without_overwriting(make_client, tmp_path):
    out = tmp_path / "served"
    out.mkdir()
    (out / "00000-7.png").write_bytes(b"someone else's")
    c = make_client(out=out)
    info = json.loads(txt2img(c, batch_size=2).json()["info"])
    assert [p.rsplit("/", 1)[1] for p in info["saved"]] == ["00001-7.png", "00002-8.png"]
    assert (out / "00000-7.png").read_bytes() == b"someone else's"
    assert txt2img(c, save_images=True).status_code == 200


def test_save_images_without_out_is_refused(client):
    assert txt2img(client, save_images=True).status_code == 422


def test_an_embedding_of_embedding_dir_is_called_by_name_and_recorded(client):
    r = txt2img(client, prompt="a shiny circle")
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert 'TI hashes: "shiny: ' in info["infotexts"][0]
    plain = txt2img(client, prompt="a circle")  # no embedding: no TI hashes
    assert "TI hashes" not in json.loads(plain.json()["info"])["infotexts"][0]
