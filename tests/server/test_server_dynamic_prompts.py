"""Dynamic prompts over the API (issue 29), as A1111 with its Dynamic Prompts extension: `{a|b}` and `__name__`
resolved per image from its seed (tiny model): info and PNGs carry the resolved prompts, a request reproduces,
bad templates and unsupported extension modes are one-line 422s naming the field."""

from __future__ import annotations

import base64
import json

import pytest

from srv import FAST
from t2i import dynamic_prompts, metadata

A = "/sdapi/v1"
TEMPLATE = "a {red|blue|green} circle"


def txt2img(client, **fields):
    return client.post(f"{A}/txt2img", json={"prompt": TEMPLATE, "seed": 10, **FAST, **fields})


def _info(r) -> dict:
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def _error(r, field: str) -> str:
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", field] and "\n" not in detail["msg"]
    return detail["msg"]


@pytest.fixture(scope="module")
def wildcard_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wildcards")
    (folder / "colors.txt").write_text("red\nblue\n")
    return folder


def test_each_image_gets_its_seeds_prompt_recorded_in_info_and_png_and_it_reproduces(client, tmp_path):
    from t2i.reproduce import reproduce

    expected = dynamic_prompts.resolve_many(TEMPLATE, [10, 11, 12, 13])
    assert len(set(expected)) > 1  # the seeds pick different variants: per-image resolution is visible
    r = txt2img(client, batch_size=2, n_iter=2)
    info = _info(r)
    assert info["prompt"] == TEMPLATE and info["all_prompts"] == expected
    for i, (text, png) in enumerate(zip(info["infotexts"], r.json()["images"])):
        assert text.startswith(expected[i] + "\n") and f"Seed: {10 + i}," in text
        path = tmp_path / f"{i}.png"
        path.write_bytes(base64.b64decode(png))
        a1111, settings = metadata.read(path)
        assert (a1111, settings.prompt, settings.prompt_template) == (text, expected[i], TEMPLATE)
    again = _info(txt2img(client, batch_size=2, n_iter=2))
    assert again["all_prompts"] == expected and again["infotexts"] == info["infotexts"]
    assert reproduce(tmp_path / "3.png", progress=False).identical


def test_wildcards_come_from_the_servers_wildcard_dir(client, make_client, wildcard_dir):
    assert "__colors__" in _error(txt2img(client, prompt="a __colors__ circle"), "prompt")  # none by default
    served = make_client(wildcard_dir=wildcard_dir)
    info = _info(txt2img(served, prompt="a __colors__ circle", batch_size=3))
    assert info["all_prompts"] == dynamic_prompts.resolve_many("a __colors__ circle", [10, 11, 12], wildcard_dir)
    assert set(info["all_prompts"]) <= {"a red circle", "a blue circle"}
    assert "no wildcard file for __shapes__" in _error(txt2img(served, prompt="a __shapes__ circle"), "prompt")


@pytest.mark.parametrize("route", [f"{A}/txt2img", "/t2i/v1/jobs"])
def test_a_bad_template_is_a_one_line_422_before_queueing(client, route):
    r = client.post(route, json={"prompt": "a {red|blue circle", "seed": 1, **FAST})
    assert "not a valid dynamic prompt" in _error(r, "prompt")


def test_the_extension_switch_in_alwayson_scripts(client):
    off = {"Dynamic Prompts v2.17.1": {"args": [False]}}
    assert _info(txt2img(client, alwayson_scripts=off))["all_prompts"] == [TEMPLATE]  # kept as written
    assert "{" not in _info(txt2img(client, alwayson_scripts={"dynamic prompts": {"args": [True]}}))["all_prompts"][0]
    combinatorial = {"Dynamic Prompts v2.17.1": {"args": [True, True]}}
    assert "combinatorial" in _error(txt2img(client, alwayson_scripts=combinatorial), "alwayson_scripts")
    assert "scripts and extensions" in _error(txt2img(client, alwayson_scripts={"ADetailer": {"args": []}}),
                                              "alwayson_scripts")


def test_a_server_without_dynamic_prompts_keeps_prompts_as_written(make_client):
    info = _info(txt2img(make_client(dynamic_prompts=False), prompt="a {red|blue} circle __x__"))
    assert info["all_prompts"] == ["a {red|blue} circle __x__"]
    assert info["infotexts"][0].startswith("a {red|blue} circle __x__\n")


def test_prompts_of_images_never_made_are_resolved_from_their_seeds_as_the_job_would():
    from t2i.server import engine

    gen = engine.GenRequest(task="text2image", prompt=TEMPLATE, negative_prompt="", steps=2, guidance=7,
                            sampler=None, seed=10, width=32, height=32, batch_size=2, n_iter=2,
                            dynamic_prompts="random")
    assert engine.resolved_prompts(gen) == dynamic_prompts.resolve_many(TEMPLATE, [10, 11, 12, 13])
    gen.dynamic_prompts = "off"
    assert engine.resolved_prompts(gen) == [TEMPLATE] * 4


def test_a_template_over_the_prompt_limit_is_refused_unparsed(make_client, monkeypatch):
    from t2i.server import Limits, engine

    monkeypatch.setattr(engine.dynamic_prompts, "is_template", lambda p: pytest.fail("parsed"))
    r = txt2img(make_client(limits=Limits(max_prompt=50)), prompt="{a|b} " * 20)
    assert r.status_code == 413 and "at most 50" in r.text
