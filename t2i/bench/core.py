"""`t2i bench`: one generation through stock diffusers and through t2i, alternating, in one process.

Stock is diffusers' plain pipeline call (StableDiffusionPipeline or the XL one) over
the same modules: the same model, scheduler config and sampler, steps, guidance,
size and seed (`generator=torch.Generator("cpu").manual_seed(seed)`). The t2i
variants are its pipeline object: plain (no speed option), each option alone, and
the options together, all without autoguidance (stock's work); a model whose folder
holds a guide gets one more row, plain t2i with its default autoguidance. After an
uncounted warm-up round each repeat runs every variant once, in turn, so a busy
machine slows them alike. The table gives medians:
mean time per denoising step (between the first and last step callbacks) and time
per call (prompt to PIL images), the speed-up over stock and over plain t2i, peak memory during the call
above what the process held before it (CPU: resident set size sampled every 2 ms;
CUDA: allocator peak), and the largest pixel difference (0-255) of the first image
from stock's and from plain t2i's. Optional: ShapeEval of each variant (bundled
demo model), and achieved GFLOP/s of a UNet step against a measured matmul peak.

`--arch sd15|sdxl` benches a randomly initialised model of that architecture's real
size (built in memory, nothing downloaded): speed does not depend on trained weights.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field

import diffusers
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from t2i import speed
from t2i.choices import BENCH_OPTIONS, BENCH_PROMPT
from t2i.demo import shapeeval
from t2i.devices import dtype_name
from t2i.samplers import make_scheduler


PROMPT = BENCH_PROMPT
STOCK, PLAIN = "stock diffusers", "t2i"
STOCK_BF16, AUTO = "stock diffusers bf16", "t2i auto"  # stock with torch_dtype=bfloat16; t2i's default


@dataclass
class Row:
    name: str
    options: list[str] | None = None  # speed option names; None for stock diffusers
    autoguidance: float = 0.0  # t2i rows run without it (stock's work) but for the one row that measures it
    step_s: list[float] = field(default_factory=list)
    call_s: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    max_diff: int = 0  # largest pixel difference of the first image from stock's (0-255)
    diff_plain: int = 0  # ... and from plain t2i's
    shapeeval: float | None = None
    dtype: str = ""  # the dtype its UNet computes in (its GFLOP/s are a share of that dtype's matmul peak)

    @property
    def step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def call(self) -> float:
        return statistics.median(self.call_s)

    @property
    def peak(self) -> int:
        return max(self.peak_bytes)


@dataclass
class Report:
    rows: list[Row]
    info: dict  # model, device, threads, sizes; unet_gflop and matmul_gflops when measured

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def to_json(self) -> dict:
        rows = [asdict(r) | {"step": r.step, "call": r.call, "peak": r.peak,
                             "speedup": self.row(STOCK).call / r.call,
                             "speedup_vs_t2i": self.row(PLAIN).call / r.call,
                             "step_gflops": self._gflops(r), "peak_share": self._share(r)}
                for r in self.rows]
        return {"info": self.info, "rows": rows}

    def _gflops(self, r: Row) -> float | None:
        flop = self.info.get("unet_gflop")
        if flop is None or any(o.startswith("cache") for o in r.options or []):
            return None  # a cached step skips most of the UNet: its FLOPs are not the full UNet's
        return flop / r.step

    def _share(self, r: Row) -> float | None:
        """The row's GFLOP/s as a share of the matmul peak of the dtype its UNet computes in."""
        g = self._gflops(r)
        peak = self.info.get("matmul_gflops_bf16" if r.dtype == "bf16" else "matmul_gflops")
        return None if g is None or not peak else g / peak


class _PeakMemory:
    """Peak memory of the block above the level at its start (CPU: RSS sampled every 2 ms)."""

    def __init__(self, device):
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


def variants(names: list[str]) -> dict[str, list[str]]:
    """The t2i variants to bench: plain t2i (`exact`), its default (`auto`), each named option alone, and all
    of them together (one cache interval: the last named). Unknown names raise UsageError before anything loads."""
    for n in names:
        speed.option_fields(n)
    names = [n for n in names if n not in ("auto", "exact")]
    out = {PLAIN: [], AUTO: ["auto"]} | {f"{PLAIN} + {n}": [n] for n in names}
    caches = [n for n in names if n.startswith("cache")]
    together = [n for n in names if not n.startswith("cache")] + caches[-1:]
    if len(together) > 1:
        out[f"{PLAIN} + {' + '.join(together)}"] = together
    return out


def stock_pipeline(pipe, dtype: torch.dtype | None = None):
    """Diffusers' plain pipeline over the same modules (no t2i code runs in its call); with `dtype`, over copies
    of them in that dtype (what `from_pretrained(..., torch_dtype=dtype)` loads)."""
    cls = getattr(diffusers, "StableDiffusionXLPipeline" if pipe.model.arch == "sdxl" else "StableDiffusionPipeline")
    keys = cls._get_signature_keys(cls)[0]
    components = {k: v for k, v in pipe.pipe.components.items() if k in keys}
    if dtype is not None:
        components = {k: copy.deepcopy(v).to(dtype) if isinstance(v, torch.nn.Module) else v
                      for k, v in components.items()}
    stock = cls(**components)
    stock.set_progress_bar_config(disable=True)
    return stock


def _dtype(pipe, row: "Row", stock) -> str:
    """The dtype a row's UNet computes in: a stock row's modules', or bf16 for a t2i row with bf16 weights or
    autocast (as `auto` resolves here)."""
    if row.options is None:
        return dtype_name(stock.unet.dtype)
    o = speed.SpeedOptions.parse(",".join(row.options)).resolved(pipe.device, pipe.dtype,
                                                                 speed.options.model_allows_bf16(pipe))
    return "bf16" if o.bf16_weights or o.bf16 else dtype_name(pipe.dtype)


def bench(pipe, steps: int | None = None, size: int | None = None, batch: int = 1, repeats: int = 3,
          options: list[str] = BENCH_OPTIONS, prompt: str = PROMPT, seed: int = 0, shapeeval: bool = False,
          flops: bool = False, stock_bf16: bool = True) -> Report:
    """Bench stock diffusers against t2i's variants on `pipe` (a Text2Image): rows in the table's order, and the
    report's context (sizes, threads; with flops=True, GFLOP/s against the fp32 and bf16 matmul peaks).

    An fp32 pipeline gets a second stock row, `stock diffusers bf16`: stock over bf16 copies of the modules
    (`torch_dtype=torch.bfloat16`, diffusers' fastest flag on a CPU), with `stock_bf16`."""
    d = pipe.defaults
    steps, guidance, sampler = steps or d.steps, d.guidance, d.sampler
    width = height = size or d.width
    stock = stock_pipeline(pipe)
    plans = variants(list(options))
    rows = [Row(STOCK)] + [Row(name, names) for name, names in plans.items()]
    if pipe.guide is not None and pipe.autoguidance:  # the model's default, priced as a row of its own
        rows.insert(2, Row(f"{PLAIN} + autoguidance {pipe.autoguidance:g}", [], autoguidance=pipe.autoguidance))
    stocks = {STOCK: stock}  # stock rows' pipelines; t2i's rows run `pipe`
    if stock_bf16 and pipe.dtype == torch.float32 and pipe.device.type in ("cpu", "cuda"):
        rows.insert(1, Row(STOCK_BF16))
        stocks[STOCK_BF16] = stock_pipeline(pipe, torch.bfloat16)
    for row in rows:
        row.dtype = _dtype(pipe, row, stocks.get(row.name, stock))
        if row.name == AUTO:  # what auto picks on this device, in the row's name
            o = speed.SpeedOptions().resolved(pipe.device, pipe.dtype, speed.options.model_allows_bf16(pipe))
            row.name = f"{AUTO} ({', '.join(n for n in o.names() if n != 'sdpa')})"
    pixels: dict[str, list[np.ndarray]] = {row.name: [] for row in rows}
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, kernels, caches) and is not counted
        for row in rows:
            times: list[float] = []
            with _options(pipe, row), _PeakMemory(pipe.device) as mem:
                start = time.perf_counter()
                images = _generate(pipe, stocks.get(row.name, stock), row, prompt, seed, steps, guidance, sampler,
                                   width, height, batch, times)
                end = time.perf_counter()
            if round_ == 0:
                continue
            row.call_s.append(end - start)
            row.step_s.append(_step_time(start, end, times))
            row.peak_bytes.append(mem.peak)
            pixels[row.name].append(np.asarray(images[0].convert("RGB"), dtype=np.int16))  # (H, W, 3)
    for row in rows:  # each round's first image against stock's and plain t2i's of the same round
        row.max_diff = max(int(np.abs(a - b).max()) for a, b in zip(pixels[row.name], pixels[STOCK]))
        row.diff_plain = max(int(np.abs(a - b).max()) for a, b in zip(pixels[row.name], pixels[PLAIN]))
    if shapeeval:
        _shapeeval(pipe, stocks, rows, steps, guidance, sampler)
    info = {"model": pipe.model.source.name, "arch": pipe.model.arch, "device": pipe.device.type,
            "dtype": str(pipe.dtype).replace("torch.", ""), "threads": torch.get_num_threads(), "steps": steps,
            "sampler": sampler, "guidance": guidance, "size": width, "batch": batch, "repeats": repeats,
            "prompt": prompt, "seed": seed}
    if flops:
        info["unet_gflop"] = unet_flops(pipe, width, height, rows=batch * (2 if guidance > 1 else 1)) / 1e9
        info["matmul_gflops"] = matmul_peak(pipe.device)
        if pipe.device.type == "cuda" or speed.cpu_has_bf16():
            info["matmul_gflops_bf16"] = matmul_peak(pipe.device, dtype=torch.bfloat16)
        elif pipe.device.type == "cpu":  # emulated bf16: a smaller product (the peak is not what it is about)
            info["matmul_gflops_bf16"] = matmul_peak(pipe.device, n=1024, repeats=2, dtype=torch.bfloat16)
    return Report(rows, info)


def _step_time(start: float, end: float, times: list[float]) -> float:
    """Mean time of a denoising step: between the first and the last step callback (the time before the first
    callback also encodes the prompt). A cached run's mean counts its full and its shallow steps alike."""
    if len(times) >= 2:
        return (times[-1] - times[0]) / (len(times) - 1)
    return (times[0] if times else end) - start


@contextlib.contextmanager
def _options(pipe, row: Row):
    """The row's speed options and autoguidance on `pipe` for the block (nothing for stock diffusers)."""
    if row.options is None:
        yield
        return
    kept, pipe.autoguidance = pipe.autoguidance, row.autoguidance
    try:
        with speed.apply(pipe, speed.SpeedOptions.parse(",".join(row.options))):
            yield
    finally:
        pipe.autoguidance = kept


def _generate(pipe, stock, row: Row, prompt: str, seed: int, steps: int, guidance: float, sampler: str, width: int,
              height: int, batch: int = 1, times: list[float] | None = None) -> list:
    """One call of the row's variant (stock diffusers' plain call, or t2i's under `_options`): its PIL images.
    `times` gets a perf_counter reading after each denoising step."""
    clock = (lambda: times.append(time.perf_counter())) if times is not None else (lambda: None)
    if row.options is None:
        def on_step_end(_pipe, i, t, kwargs):
            clock()
            return kwargs

        stock.scheduler = make_scheduler(sampler, pipe._scheduler_config, seed=seed)
        return stock(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                     num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(seed),
                     callback_on_step_end=on_step_end).images
    pipe.on_step = lambda i: clock()
    try:
        return pipe(prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed, width=width, height=height,
                    batch=batch, progress=False).images
    finally:
        pipe.on_step = None


def _shapeeval(pipe, stocks, rows, steps, guidance, sampler, seeds=(0, 1)) -> None:
    """ShapeEval accuracy of each variant on a fixed subset (every 12th prompt: 13 prompts x 2 seeds)."""
    prompts = shapeeval.build_prompts()[::12]
    size = pipe.defaults.width, pipe.defaults.height
    for row in rows:
        images = []
        with _options(pipe, row):
            for p in prompts:
                for s in seeds:
                    images += _generate(pipe, stocks.get(row.name, stocks[STOCK]), row, p.prompt, s, steps, guidance,
                                        sampler, *size)
        checks = [shapeeval.check(img, p) for img, p in zip(images, [p for p in prompts for _ in seeds])]
        row.shapeeval = float(np.mean(checks))


# ---------------------------------------------------------------------------------------------- FLOPs and peak


def unet_flops(pipe, width: int, height: int, rows: int) -> int:
    """FLOPs of one UNet call on `rows` latents (classic attention, so its matmuls are counted too)."""
    unet, f = pipe.pipe.unet, pipe.vae_scale_factor
    sample = torch.zeros(rows, unet.config.in_channels, height // f, width // f, device=pipe.device,
                         dtype=pipe.dtype)  # (rows, C, h, w)
    context = torch.zeros(rows, 77, unet.config.cross_attention_dim, device=pipe.device, dtype=pipe.dtype)
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and 6 size/crop ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(rows, pooled, device=pipe.device, dtype=pipe.dtype),
                 "time_ids": torch.zeros(rows, 6, device=pipe.device, dtype=pipe.dtype)}
    with speed.attention(pipe, sdpa=False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, 500, context, added_cond_kwargs=added)
    return counter.get_total_flops()


def matmul_peak(device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul rate in `dtype` in GFLOP/s: the best of a few n x n products, as a practical peak."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------------------------- random models


# ---------------------------------------------------------------------------------------------- output


def table(rows: list[Row], info: dict | None = None) -> str:
    """The rows as a text table: speed against stock and plain t2i, memory, pixel differences (and GFLOP/s)."""
    report = Report(rows, info or {})
    stock, plain = report.row(STOCK), report.row(PLAIN)
    gflops = "unet_gflop" in report.info
    se = rows[0].shapeeval is not None
    w = max(len(r.name) for r in rows)
    head = (f"{'variant':{w}s} {'step ms':>8s} {'call s':>8s} {'speed-up':>8s} {'vs t2i':>7s} {'peak MiB':>9s} "
            f"{'diff':>5s} {'diff t2i':>8s}" + (f" {'GFLOP/s':>8s} {'of peak':>7s}" if gflops else "")
            + (" ShapeEval" if se else ""))
    lines = [head]
    for r in rows:
        line = (f"{r.name:{w}s} {r.step * 1000:8.1f} {r.call:8.3f} {stock.call / r.call:7.2f}x "
                f"{plain.call / r.call:6.2f}x {r.peak / 2**20:9.1f} {r.max_diff:5d} {r.diff_plain:8d}")
        if gflops:
            g, share = report._gflops(r), report._share(r)
            line += f" {g:8.1f}" if g is not None else f" {'-':>8s}"
            line += f" {share:6.0%} {r.dtype}" if share is not None else f" {'-':>7s}"
        if se:
            line += f" {r.shapeeval:9.3f}"
        lines.append(line)
    lines.append("medians over the repeats; step = mean time of a denoising step; speed-up = stock's call time / "
                 "this call time, vs t2i = plain t2i's / this;\ndiff = largest pixel difference of the first image "
                 "from stock's, diff t2i = from plain t2i's (0-255); peak = memory above the level before the call")
    if gflops:
        i = report.info
        bf16 = i.get("matmul_gflops_bf16")
        lines.append(f"UNet: {i['unet_gflop']:.1f} GFLOP per step ({i['batch']} image(s) x cond/uncond rows); "
                     f"matmul peak of this machine: fp32 {i['matmul_gflops']:.1f} GFLOP/s"
                     + (f", bf16 {bf16:.1f} GFLOP/s" if bf16 else "")
                     + " (GFLOP/s = UNet FLOPs / step time; of peak = share of the peak of the row's own dtype; "
                       "'-' for cached steps)")
    return "\n".join(lines)


def header(info: dict) -> str:
    return (f"{info['model']} ({info['arch']}), {info['device']} {info['dtype']}, {info['threads']} threads, "
            f"{info['size']}x{info['size']}, {info['steps']} steps {info['sampler']}, guidance {info['guidance']}, "
            f"batch {info['batch']}, {info['repeats']} repeats")


# ---------------------------------------------------------------------------------------------- CLI


