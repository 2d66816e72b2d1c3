"""Styles in the shapes world: datasets to fine-tune a LoRA on, and a metric that sees the style.

`outline`: every shape drawn as a 2-pixel outline instead of filled. Its metric,
`hollowness`, is the share of each object's enclosed area that is *not* paint:
about 0 for filled shapes, well above 0.4 for outlines.
`pastel`: every colour washed 60% towards white. Its metric, `paleness`, is one
minus the mean saturation of the painted pixels.
Both need no model, only the background colour (read off the image border).
`mosaic`: a structural style, the render pixelated into 8 x 8-pixel blocks (each block
its mean colour). Its metric, `blockiness`, is the share of the image's gradient energy
that lies on the block edges: about 1/8 for anything without blocks, 1 for a perfect
mosaic. What the model's VAE can reproduce of a style (its ceiling) is measured by
`vae_ceiling` and reported by `t2i eval --style`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.demo import shapeeval
from t2i.demo.shapes import IMAGE_SIZE, Scene, render, sample_scene
from t2i.errors import UsageError

OUTLINE_WIDTH = 2  # pixels at 64 x 64


def _outline(draw, points, color, scale):
    draw.line(points + points[:1], fill=color, width=round(OUTLINE_WIDTH * scale), joint="curve")


def _pastel(draw, points, color, scale):
    draw.polygon(points, fill=tuple(round(c + (255 - c) * PASTEL_MIX) for c in color))


PASTEL_MIX = 0.6  # share of white mixed into every object colour


def render_outline(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Like shapes.render, but each object is its outline only."""
    return render(scene, size, paint=_outline)


def render_pastel(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Like shapes.render, but each object's colour is washed towards white."""
    return render(scene, size, paint=_pastel)


MOSAIC_BLOCK = 8  # pixels, at any size: 8 x 8 blocks at 64 x 64, 2 x 2 latent pixels of the bundled VAE each


def render_mosaic(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Like shapes.render, pixelated: every MOSAIC_BLOCK x MOSAIC_BLOCK-pixel block filled with its mean colour."""
    n = max(1, size // MOSAIC_BLOCK)  # blocks per side
    return render(scene, size).resize((n, n), Image.BOX).resize((size, size), Image.NEAREST)


STYLES = {"outline": render_outline, "pastel": render_pastel, "mosaic": render_mosaic, "plain": render}


def write_dataset(folder: str | Path, style: str, n: int, seed: int = 0) -> Path:
    """n scenes of the training distribution in `style`: NNNN.png + NNNN.txt (the scene's caption)."""
    if style not in STYLES:
        raise UsageError(f"unknown style {style!r}; use one of: {', '.join(STYLES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.glob("*.png")):
        raise UsageError(f"{folder} already holds images; choose an empty folder")
    for i in range(n):
        scene = sample_scene(10**8 + seed + i)  # far from the base model's own training seeds
        STYLES[style](scene).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(scene.caption + "\n")
    (folder / "style.json").write_text(json.dumps({"style": style, "n": n, "seed": seed}) + "\n")
    return folder


# --------------------------------------------------------------------------- the metric


def _background(a: np.ndarray) -> np.ndarray:
    """The most common colour on the image border, (3,)."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (4N, 3)
    colors, counts = np.unique(border // 8, axis=0, return_counts=True)
    mode = colors[counts.argmax()]
    return border[(border // 8 == mode).all(axis=1)].mean(axis=0)


def hollowness(img: Image.Image, threshold: float = 48.0) -> float | None:
    """Share of the painted objects' enclosed area that is background (None: nothing painted)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    paint = np.abs(a - _background(a)).max(axis=2) > threshold  # (H, W)
    if paint.sum() < 4:
        return None
    outside = np.zeros_like(paint)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~paint[0, :], ~paint[-1, :], ~paint[:, 0], ~paint[:, -1]
    while True:  # flood fill of the background from the border, 4-connected
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~paint
        if (grown == outside).all():
            break
        outside = grown
    enclosed = ~outside  # paint plus the holes it encloses
    return float(1.0 - paint.sum() / enclosed.sum())


def paleness(img: Image.Image, threshold: float = 48.0) -> float | None:
    """1 - mean HSV saturation of the painted pixels: ~0.1 for the world's colours, ~0.6 for pastels."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    paint = np.abs(a - _background(a)).max(axis=2) > threshold  # (H, W)
    if paint.sum() < 4:
        return None
    hi, lo = a.max(axis=2)[paint], a.min(axis=2)[paint]  # (N,)
    return float(1.0 - np.mean((hi - lo) / np.maximum(hi, 1.0)))


def blockiness(img: Image.Image, block: int = MOSAIC_BLOCK) -> float | None:
    """Share of the gradient energy (squared neighbour differences, both axes) that lies on block edges.

    Block edges are between pixels k*block - 1 and k*block; at 64 x 64 with 8-px blocks they are 7 of the 63
    neighbour pairs per row, so an image without blocks scores about 0.11 and a perfect mosaic 1.
    None: a flat image (no gradient at all)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    dx = ((a[:, 1:] - a[:, :-1]) ** 2).sum(axis=(0, 2))  # (W-1,) energy between column j and j+1
    dy = ((a[1:] - a[:-1]) ** 2).sum(axis=(1, 2))  # (H-1,)
    total = dx.sum() + dy.sum()
    if total < 1.0:
        return None
    edges_x = (np.arange(1, a.shape[1]) % block) == 0  # the pair (j-1, j) straddles an edge when j % block == 0
    edges_y = (np.arange(1, a.shape[0]) % block) == 0
    return float((dx[edges_x].sum() + dy[edges_y].sum()) / total)


METRICS = {"outline": hollowness, "pastel": paleness, "mosaic": blockiness, "plain": paleness}


def style_score(images: list[Image.Image], style: str = "outline") -> float:
    """The style's metric, averaged over the images that show any object."""
    values = [v for v in map(METRICS[style], images) if v is not None]
    return float(np.mean(values)) if values else 0.0


# --------------------------------------------------------------------------- a LoRA's style, measured


def style_eval(pipe, lora: str, style: str, trigger: str, prompts=None, seeds=(0, 1), scale: float = 1.0,
               data: list[Image.Image] | None = None) -> dict[str, dict[str, float]]:
    """Style metric and ShapeEval accuracy of the same prompts, with and without the LoRA and its trigger.

    Rows: `style data` (the prompts' ground-truth scenes rendered in the style, or `data`: a user's own images),
    `style data through the VAE (ceiling)` (the same, encoded and decoded by the pipeline's VAE: the most any
    UNet LoRA can show), `base` (no LoRA), `base + trigger words`, `lora + trigger`, `lora, no trigger`,
    `lora at scale 0 + trigger` (must equal `base + trigger words`). The `lora + trigger` row also holds
    `share_of_ceiling`, (lora + trigger - base) / (ceiling - base) of the style metric (see ceiling_share).
    """
    from t2i.train.data import with_trigger  # deferred: torch; `t2i train style-data` renders with PIL alone

    prompts = list(prompts or shapeeval.build_prompts()[::12])
    rows = ceiling_rows(pipe, style, prompts, seeds, data)
    runs = {
        "base": ("", []),
        "base + trigger words": (trigger, []),
        "lora + trigger": (trigger, [f"{lora}:{scale}"]),
        "lora, no trigger": ("", [f"{lora}:{scale}"]),
        "lora at scale 0 + trigger": (trigger, [f"{lora}:0"]),
    }
    for name, (words, loras) in runs.items():
        images, passed = [], []
        for p in prompts:
            text = with_trigger(p.prompt, words)
            out = pipe(text, seed=seeds[0], batch=len(seeds), loras=loras, progress=False).images
            images += out
            passed += [shapeeval.check(img, p) for img in out]
        rows[name] = {"style": style_score(images, style), "shapeeval": float(np.mean(passed))}
    rows["lora + trigger"]["share_of_ceiling"] = ceiling_share(rows, "lora + trigger")
    return rows


def embedding_eval(pipe, embedding: str | Path, style: str, prompts=None, seeds=(0, 1),
                   data: list[Image.Image] | None = None) -> dict[str, dict[str, float]]:
    """Style metric and ShapeEval accuracy of the same prompts without and with a style embedding's name.

    Rows: `style data` and `style data through the VAE (ceiling)` (as style_eval's), `base` (the prompts alone),
    `base + the name as a word` (the name appended, no embedding file: just a word), `embedding` (the name calls
    the embedding; also holds `share_of_ceiling`).
    """
    from t2i.embeddings import EmbeddingSet  # deferred: torch; `t2i train style-data` renders with PIL alone
    from t2i.train.data import with_trigger

    name = Path(embedding).stem
    prompts = list(prompts or shapeeval.build_prompts()[::12])
    rows = ceiling_rows(pipe, style, prompts, seeds, data)
    runs = {"base": ("", {}), "base + the name as a word": (name, {}), "embedding": (name, {name: Path(embedding)})}
    kept = pipe.embeddings
    try:
        for row, (words, files) in runs.items():
            pipe.embeddings = EmbeddingSet(files=files, allow_pickle=kept.allow_pickle)
            images, passed = [], []
            for p in prompts:
                out = pipe(with_trigger(p.prompt, words), seed=seeds[0], batch=len(seeds), progress=False).images
                images += out
                passed += [shapeeval.check(img, p) for img in out]
            rows[row] = {"style": style_score(images, style), "shapeeval": float(np.mean(passed))}
    finally:
        pipe.embeddings = kept
    rows["embedding"]["share_of_ceiling"] = ceiling_share(rows, "embedding")
    return rows


def transfer_eval(pipe, lora: str, style: str, trigger: str, strengths=(0.3, 0.5, 0.7), prompts=None,
                  seeds=(0, 1), scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Style transfer by img2img: ground-truth renders of ShapeEval prompts (the content) redrawn with the LoRA.

    For each strength, the style metric of the outputs and ShapeEval's checker on them
    against the content's own prompt (is the content still there?). Reference rows: the
    content itself, and the same scenes rendered in the style (what a perfect transfer
    would score), and img2img with the trigger words but no LoRA (what img2img alone does).
    """
    # deferred: torch and diffusers; `t2i train style-data` renders with PIL alone
    from t2i.pipelines import Image2Image
    from t2i.train.data import with_trigger  # the caption rule of training

    img2img = Image2Image.from_pipe(pipe)  # the same loaded components
    prompts = list(prompts or shapeeval.build_prompts()[::12])
    cases = [(p, shapeeval.ground_truth_scene(p, seed)) for p in prompts for seed in seeds]

    def score(images):
        passed = [shapeeval.check(img, p) for img, (p, _) in zip(images, cases)]
        return {"style": style_score(images, style), "shapeeval": float(np.mean(passed))}

    content = [render(scene) for _, scene in cases]
    rows = {"content (renders)": score(content),
            f"content rendered {style}": score([STYLES[style](scene) for _, scene in cases])}
    for strength in strengths:
        for name, loras in (("trigger words, no LoRA", []), ("LoRA + trigger", [f"{lora}:{scale}"])):
            images = []
            for (p, _), init in zip(cases, content):
                images += img2img(with_trigger(p.prompt, trigger), init, strength=strength, seed=0, loras=loras,
                                  progress=False).images
            rows[f"img2img {strength:g}, {name}"] = score(images)
    return rows


# --------------------------------------------------------------------------- the VAE's ceiling

DATA_ROW, CEILING_ROW = "style data", "style data through the VAE (ceiling)"


def vae_ceiling(pipe, images: list[Image.Image], batch: int = 16) -> list[Image.Image]:
    """The images encoded and decoded by the pipeline's VAE: the closest any UNet's latents can come to them."""
    from t2i.demo.evaluation import vae_round_trip  # deferred: torch

    through = vae_round_trip(pipe)
    return [out for i in range(0, len(images), batch) for out in through(images[i:i + batch])]


def ceiling_rows(pipe, style: str, prompts, seeds=(0, 1), data: list[Image.Image] | None = None) -> dict:
    """The `style data` row and its `... through the VAE (ceiling)` row: the style metric of the data and of the
    data after the VAE's round trip, which is what a perfect UNet (or LoRA) would score.

    `data` None: ShapeEval's ground-truth scenes of `prompts` x `seeds` rendered in the style (the very images a
    perfect LoRA would draw for the eval's prompts), which ShapeEval's checker also scores. Else the user's own
    images (style metric only: they have no ShapeEval prompt)."""
    if data is None:
        cases = [(p, shapeeval.ground_truth_scene(p, seed)) for p in prompts for seed in seeds]
        raw = [STYLES[style](scene) for _, scene in cases]
        through = vae_ceiling(pipe, raw)

        def score(images):
            passed = [shapeeval.check(img, p) for img, (p, _) in zip(images, cases)]
            return {"style": style_score(images, style), "shapeeval": float(np.mean(passed))}

        return {DATA_ROW: score(raw), CEILING_ROW: score(through)}
    return {DATA_ROW: {"style": style_score(data, style)},
            CEILING_ROW: {"style": style_score(vae_ceiling(pipe, data), style)}}


def ceiling_share(rows: dict[str, dict[str, float]], row: str, base: str = "base") -> float | None:
    """(row - base) / (ceiling - base) of the style metric: 0 = the base model, 1 = all the VAE lets through.
    None when the ceiling does not differ from the base (the style is invisible to the metric after the VAE)."""
    gap = rows[CEILING_ROW]["style"] - rows[base]["style"]
    if abs(gap) < 1e-6:
        return None
    return float((rows[row]["style"] - rows[base]["style"]) / gap)


def share_line(rows: dict[str, dict[str, float]], row: str) -> str:
    share = rows[row].get("share_of_ceiling")
    value = "n/a (the ceiling equals the base)" if share is None else f"{share:.0%}"
    return f"share of the way to the VAE's ceiling, ({row} - base) / (ceiling - base): {value}"


def style_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':38s} {'style':>7s} {'ShapeEval':>9s}"]
    for name, r in rows.items():
        se = f"{r['shapeeval']:9.3f}" if "shapeeval" in r else f"{'-':>9s}"
        lines.append(f"{name:38s} {r['style']:7.3f} {se}")
    return "\n".join(lines)
