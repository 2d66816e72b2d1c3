"""Images stay bit-identical across refactors: hashes of a few bundled-model images per kind of CPU.

The images are the exact path's (`pipe.speed = "exact"`, as Image2Image/Inpaint.from_pipe inherit): what `auto`
picks depends on the CPU's bf16 instructions, and tests/speed/test_auto.py checks it against this path.

Float kernels round differently on AVX2, AVX-512 and AMX, so a hash holds for one kind
of CPU only: each kind has its own row, and a kind with no row is skipped with the
command that records one (`python tests/pipelines/test_golden_images.py` prints this CPU's row).
A hash that changes is a change of the images every user gets: on purpose (then
re-record and say so in the commit) or a bug.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

RECORDED = {
    "AVX2 torch 2.13.0": {"text2image": "5f25b2b9fc9992a9", "batch-euler-a": "8c8e262385539f66,91aecdef30af2bcd",
                          "weighted-sde": "a9bd309c0189bd7b", "batched-cache3:1": "971860663ab24889,c2902c7160f66ccd",
                          "image2image": "d1d26102f07fdc81", "inpaint": "99b2cbc8f966817a"},
}


def cpu_kind() -> str:
    """What decides the rounding: torch's vector ISA, AMX, and the torch release."""
    flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    amx = "+amx" if "amx_bf16" in flags else ""
    return f"{torch.backends.cpu.get_cpu_capability()}{amx} torch {torch.__version__.split('+')[0]}"


def _hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]


def images() -> dict[str, str]:
    """The cases: each feature on the plain path, a speed option, img2img and inpainting."""
    from t2i import speed
    from t2i.pipelines import Image2Image, Inpaint, Text2Image

    torch.set_num_threads(1)
    pipe = Text2Image.from_pretrained(device="cpu")
    pipe.speed = "exact"  # the rows are the exact path's (fp32, per-image UNet calls), the same whatever `auto` picks
    out = {}
    first = pipe("a red circle to the left of a blue square", seed=1, steps=6, progress=False).images[0]
    out["text2image"] = _hash(first)
    batch = pipe("two green stars", seed=7, steps=5, batch=2, sampler="euler-a", progress=False).images
    out["batch-euler-a"] = ",".join(_hash(i) for i in batch)
    out["weighted-sde"] = _hash(pipe("a (red:1.3) circle, [blue]", seed=3, steps=5, guidance=4.0,
                                                 sampler="dpm++sde-karras", progress=False).images[0])
    with speed.apply(pipe, speed.SpeedOptions.parse("batched,cache3:1")):
        out["batched-cache3:1"] = ",".join(_hash(i) for i in pipe("a yellow triangle", seed=4, steps=6,
                                                                   batch=2, progress=False).images)
    img2img = Image2Image.from_pipe(pipe)
    out["image2image"] = _hash(img2img("a purple heart", first, strength=0.6, seed=5, steps=6,
                                       progress=False).images[0])
    mask = Image.new("L", first.size, 0)
    mask.paste(255, (0, 0, first.width // 2, first.height))
    inpaint = Inpaint.from_pipe(pipe)
    out["inpaint"] = _hash(inpaint("an orange square", first, mask, seed=6, steps=6, progress=False).images[0])
    return out


@pytest.mark.skipif(cpu_kind() not in RECORDED, reason=f"no image hashes recorded for this CPU ({cpu_kind()}); "
                    "`python tests/pipelines/test_golden_images.py` prints them")
def test_bundled_model_images_are_unchanged():
    assert images() == RECORDED[cpu_kind()]


if __name__ == "__main__":
    print(f"    {cpu_kind()!r}: {images()!r},")
