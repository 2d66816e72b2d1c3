"""`t2i eval`: ShapeEval on a model (default: the bundled demo model)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from t2i.demo import shapeeval


@dataclass
class EvalRun:
    report: shapeeval.EvalReport
    grid: Path | None
    results: Path | None


def pipeline_generator(pipe, steps=None, sampler=None, guidance=None, progress=False):
    """A `generate(prompts, seeds)` for shapeeval.evaluate: runs of one prompt with consecutive seeds share a call."""

    def generate(prompts: list[str], seeds: list[int]):
        images, i = [], 0
        while i < len(prompts):
            j = i + 1
            while j < len(prompts) and prompts[j] == prompts[i] and seeds[j] == seeds[j - 1] + 1:
                j += 1
            out = pipe(prompts[i], seed=seeds[i], batch=j - i, steps=steps, sampler=sampler, guidance=guidance,
                       progress=progress)
            images += out.images
            i = j
        return images

    return generate


def vae_round_trip(pipe):
    """Images -> the same images encoded (latent mean) and decoded by the pipeline's VAE (its small decoder when
    `--speed tiny_vae` set one): what the decoder makes of the best latents a UNet could hand it."""
    vae = pipe.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def through(images):
        x = pipe.pipe.image_processor.preprocess(images).to(pipe.device, vae.dtype)  # (B, 3, H, W) in [-1, 1]
        latents = (vae.encode(x).latent_dist.mode() - shift) * vae.config.scaling_factor
        return pipe._decode(latents.to(pipe.dtype))

    return through


def _seen(d) -> str:
    """One detected object as the JSON's reader wants it: "red circle at (20, 31), 210 px"."""
    return f"{d.color} {d.shape} at ({d.cx:.0f}, {d.cy:.0f}), {d.area} px"


def run_eval(pipe, steps=None, sampler=None, guidance=None, seeds=(0, 1, 2, 3), out: str | Path | None = None,
             prompts=None, progress=False) -> EvalRun:
    """Generate every ShapeEval prompt with each seed, check them, write a grid and a JSON of results."""
    report = shapeeval.evaluate(pipeline_generator(pipe, steps, sampler, guidance, progress), prompts=prompts,
                                seeds=seeds)
    grid = results = None
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        grid = folder / "shapeeval-grid.png"
        report.grid(grid)
        results = folder / "shapeeval.json"
        per_prompt = [{"prompt": r.prompt.prompt, "category": r.prompt.category, "held_out": r.prompt.held_out,
                       "seed": r.seed, "passed": r.passed, "found": [_seen(d) for d in r.found]}
                      for r in report.results]
        results.write_text(json.dumps({"summary": report.to_dict(), "results": per_prompt}, indent=1))
    return EvalRun(report, grid, results)
