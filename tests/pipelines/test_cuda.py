"""Tier 3 on a CUDA device (`pytest -m gpu`): the bundled model in fp16 and fp32 on the GPU.

The noise is drawn on the CPU, so a seed means the same starting latents on any
device; the GPU's kernels round differently, so images are compared within a
tolerance across devices and exactly on the same device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_pipe():
    from t2i.pipelines import Text2Image

    pipe = Text2Image.from_pretrained(device="cuda", dtype="fp16")
    pipe.speed = "exact"  # per-image UNet calls (auto batches them)
    return pipe


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_fp16_images_are_finite_recorded_and_repeat(cuda_pipe):
    first = cuda_pipe("a red circle to the left of a blue square", seed=1, progress=False)
    again = cuda_pipe("a red circle to the left of a blue square", seed=1, progress=False)
    assert first.settings[0].device.startswith("cuda") and first.settings[0].dtype == "fp16"
    assert _pixels(first.images[0]).std() > 5  # not a blank or NaN-black image
    assert np.array_equal(_pixels(first.images[0]), _pixels(again.images[0]))


def test_a_batch_equals_its_single_runs_on_the_gpu(cuda_pipe):
    batch = cuda_pipe("two green stars", seed=7, batch=3, progress=False).images
    for i, image in enumerate(batch):
        single = cuda_pipe("two green stars", seed=7 + i, progress=False).images[0]
        assert np.abs(_pixels(image) - _pixels(single)).max() <= 1


def test_the_gpu_draws_the_cpus_image(cuda_pipe):
    """Same seed on CPU fp32 and GPU fp32: the same picture up to kernel rounding."""
    from t2i.pipelines import Text2Image

    cpu = Text2Image.from_pretrained(device="cpu")("a yellow triangle", seed=3, progress=False).images[0]
    gpu = cuda_pipe.to("cuda", "fp32")
    try:
        image = gpu("a yellow triangle", seed=3, progress=False).images[0]
    finally:
        cuda_pipe.to("cuda", "fp16")
    assert np.abs(_pixels(cpu) - _pixels(image)).mean() < 2.0
