"""`t2i bench`: one generation through stock diffusers and through t2i, alternating, in one process.

Stock is the plain diffusers pipeline call over the same modules (same model,
sampler, steps, guidance, seed, size). The t2i variants are its pipeline with
speed switches. After an uncounted warm-up round, each repeat runs every variant
once, in turn, so a busy machine
slows them alike; the table gives medians: time per UNet step (between step
callbacks), time per call (prompt to PIL images), the ratio to stock, peak memory
during the call above what the process held before it (CPU: resident set size,
sampled; CUDA: allocator peak), and the largest pixel difference from stock.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .samplers import make_scheduler

PROMPT = "a red circle to the left of a blue square"


@dataclass
class Row:
    name: str
    step_s: list[float] = field(default_factory=list)
    call_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    max_diff: int = 0
    shapeeval: float | None = None

    @property
    def step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def call(self) -> float:
        return statistics.median(self.call_s)

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)


class _PeakMemory:
    """Peak memory of the block above the level at its start (CPU: RSS sampled every 2 ms)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base, self._stop = self._rss(), threading.Event()
        self.peak_abs = self.base

        def sample():
            while not self._stop.wait(0.002):
                self.peak_abs = max(self.peak_abs, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak_abs, self._rss()) - self.base


def _step_clock(times: list[float]):
    def on_step_end(pipe, i, t, kwargs):
        times.append(time.perf_counter())
        return kwargs

    return on_step_end


def variants(names: list[str]) -> dict[str, list]:
    """The t2i variants to bench: 'plain' (t2i's defaults) and each named switch alone, plus all together."""
    from .speed import batched, channels_last, feature_cache

    switches = {"batched": batched, "channels_last": channels_last,
                "cache2": lambda pipe: feature_cache(pipe, 2), "cache3": lambda pipe: feature_cache(pipe, 3)}
    unknown = [n for n in names if n not in switches]
    if unknown:
        from .errors import UsageError

        raise UsageError(f"unknown speed option {unknown[0]!r}; choose from: {', '.join(switches)}")
    out = {"t2i": []}
    out |= {f"t2i + {n}": [switches[n]] for n in names}
    caches = [n for n in names if n.startswith("cache")]
    together = [n for n in names if not n.startswith("cache")] + caches[-1:]  # one cache interval at a time
    if len(together) > 1:
        out[f"t2i + {' + '.join(together)}"] = [switches[n] for n in together]
    return out


def _stock(pipe):
    """The plain diffusers pipeline over the same modules (no t2i code in its call)."""
    import diffusers

    cls = getattr(diffusers, "StableDiffusionXLPipeline" if pipe.model.arch == "sdxl" else "StableDiffusionPipeline")
    keys = cls._get_signature_keys(cls)[0]
    stock = cls(**{k: v for k, v in pipe.pipe.components.items() if k in keys})
    stock.set_progress_bar_config(disable=True)
    return stock


def run(pipe, steps: int | None = None, size: int | None = None, batch: int = 1, repeats: int = 3,
        options: list[str] = ("batched",), prompt: str = PROMPT, seed: int = 0, shapeeval: bool = False
        ) -> list[Row]:
    """Bench stock diffusers against t2i's variants on `pipe` (a Text2Image); rows in the table's order."""
    d = pipe.defaults
    steps, guidance, sampler = steps or d.steps, d.guidance, d.sampler
    width = height = size or d.width
    stock = _stock(pipe)
    rows = {"stock diffusers": Row("stock diffusers")}
    plans = variants(list(options))
    rows |= {name: Row(name) for name in plans}
    reference = None
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches) and is not counted
        for name, row in rows.items():
            times: list[float] = []
            with contextlib.ExitStack() as stack:
                for switch in plans.get(name, []):
                    stack.enter_context(switch(pipe))
                with _PeakMemory(pipe.device) as mem:
                    start = time.perf_counter()
                    if name == "stock diffusers":
                        stock.scheduler = make_scheduler(sampler, pipe._scheduler_config, seed=seed)
                        images = stock(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height,
                                       width=width, num_images_per_prompt=batch,
                                       generator=torch.Generator("cpu").manual_seed(seed),
                                       callback_on_step_end=_step_clock(times)).images
                    else:
                        pipe.on_step = lambda i, t=times: t.append(time.perf_counter())
                        try:
                            images = pipe(prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                          width=width, height=height, batch=batch, progress=False).images
                        finally:
                            pipe.on_step = None
                    end = time.perf_counter()
            if round_ == 0:
                continue
            row.call_s.append(end - start)
            row.step_s.append(statistics.median(np.diff([start, *times])) if times else end - start)
            row.peak_bytes.append(mem.peak)
            pixels = np.asarray(images[0].convert("RGB"), dtype=np.int16)
            reference = pixels if reference is None else reference
            row.max_diff = max(row.max_diff, int(np.abs(pixels - reference).max()))
    if shapeeval:
        _shapeeval(pipe, stock, rows, plans, steps, guidance, sampler)
    return list(rows.values())


def _shapeeval(pipe, stock, rows, plans, steps, guidance, sampler, seeds=(0, 1)) -> None:
    """ShapeEval accuracy of each variant on a fixed subset (13 prompts x 2 seeds)."""
    from . import shapeeval

    prompts = shapeeval.build_prompts()[::12]
    for name, row in rows.items():
        images = []
        with contextlib.ExitStack() as stack:
            for switch in plans.get(name, []):
                stack.enter_context(switch(pipe))
            for p in prompts:
                for s in seeds:
                    if name == "stock diffusers":
                        stock.scheduler = make_scheduler(sampler, pipe._scheduler_config, seed=s)
                        images += stock(p.prompt, num_inference_steps=steps, guidance_scale=guidance,
                                        height=pipe.defaults.height, width=pipe.defaults.width,
                                        generator=torch.Generator("cpu").manual_seed(s)).images
                    else:
                        images += pipe(p.prompt, steps=steps, guidance=guidance, sampler=sampler, seed=s,
                                       progress=False).images
        checks = [shapeeval.check(img, p) for img, p in zip(images, [p for p in prompts for _ in seeds])]
        row.shapeeval = float(np.mean(checks))


def table(rows: list[Row]) -> str:
    stock = rows[0]
    lines = [f"{'':34s} {'step ms':>8s} {'call s':>8s} {'speed-up':>8s} {'peak MiB':>9s} {'max |diff|':>10s}"
             + (f" {'ShapeEval':>9s}" if rows[0].shapeeval is not None else "")]
    for r in rows:
        line = (f"{r.name:34s} {r.step * 1000:8.1f} {r.call:8.3f} {stock.call / r.call:7.2f}x "
                f"{r.peak / 2**20:9.1f} {r.max_diff:10d}")
        if r.shapeeval is not None:
            line += f" {r.shapeeval:9.3f}"
        lines.append(line)
    lines.append("medians over the repeats; speed-up = stock call time / this call time; "
                 "max |diff| = largest pixel difference from stock's image (0-255)")
    return "\n".join(lines)

