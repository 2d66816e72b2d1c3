"""The one request path (t2i.jobs): checks before any model loads, and the images of a pipeline call."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from t2i import jobs
from t2i.errors import UsageError


@pytest.mark.parametrize("fields, words", [
    ({"steps": 0}, "steps"),
    ({"batch": 0}, "batch"),
    ({"iterations": 0}, "iterations"),
    ({"sampler": "eulr"}, "sampler"),
    ({"width": 100}, "multiple of 8"),
    ({"prompts": ["a <lora:missing:0.5> circle"], "lora_dir": "."}, "missing.safetensors"),
    ({"prompts": ["a <lora:missing:0.5> circle"]}, "--lora-dir"),
    ({"loras": ["nowhere.safetensors"]}, "does not exist"),
    ({"task": "inpaint"}, "init image"),
    ({"speed": "cache0x"}, "speed option"),
])
def test_bad_requests_fail_in_one_line_before_loading(no_model_load, tiny_sd, fields, words):
    request = jobs.Request(**{"prompts": ["a circle"], "model": str(tiny_sd), **fields})
    with pytest.raises(UsageError, match=words) as err:
        jobs.check(request)
    assert "\n" not in str(err.value)


def test_a_job_makes_what_the_pipeline_makes(sd_pipe, tiny_sd):
    job = jobs.check(jobs.Request(["a red circle"], model=str(tiny_sd), seed=3, steps=2, batch=2, iterations=2))
    results = list(jobs.run(jobs.prepare(sd_pipe, job), job))
    seeds = [s.seed for r in results for s in r.settings]
    assert seeds == [3, 4, 5, 6]  # iteration k starts at seed + k * batch, as A1111's n_iter
    alone = sd_pipe("a red circle", seed=5, steps=2, progress=False).images[0]
    assert np.array_equal(np.asarray(results[1].images[0]), np.asarray(alone))


def test_png_bytes_carry_the_metadata_the_writer_writes(sd_pipe, tiny_sd, tmp_path):
    from t2i import metadata
    from t2i.output import save_images

    job = jobs.check(jobs.Request(["a blue square"], model=str(tiny_sd), seed=1, steps=2))
    result = next(jobs.run(jobs.prepare(sd_pipe, job), job))
    (written,) = save_images(result.images, result.settings, tmp_path)
    memory = tmp_path / "memory.png"
    memory.write_bytes(jobs.png_bytes(result.images[0], result.settings[0]))
    assert metadata.read(written) == metadata.read(memory)
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(memory)))
