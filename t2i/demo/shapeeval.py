"""ShapeEval: a GenEval-style benchmark over the shapes world, checked without a learned model.

`PROMPTS` is a fixed prompt set in GenEval's six categories (single object,
two objects, counting, colours, position, colour binding), worded like the
training captions of `t2i.shapes`; some use compositions held out of training.
`detect` reads the objects in a 64x64 image by classical image analysis, and
`check` says whether they satisfy a prompt. `evaluate` scores any
text-to-image callable; `ground_truth_accuracy` scores the checker itself on
renders that satisfy each prompt by construction.

    def generate(prompts, seeds):
        return [pipe(p, seed=s).images[0] for p, s in zip(prompts, seeds)]

    report = evaluate(generate)
    print(report.table())
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from t2i.errors import UsageError
from t2i.demo.shapes import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_PAIRS,
    HELD_OUT_RELATIONS,
    IMAGE_SIZE,
    NUMBERS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SUPERSAMPLE,
    Scene,
    ShapeObject,
    _MIRROR,
    _object,
    _place_relation,
    _scatter,
    polygon,
    position_of,
    relation_holds,
    render,
    shape_mask,
)

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PROMPT_SEED = 0  # the prompt set is drawn once from this seed and never changes

MIN_AREA = 12  # pixels; smaller components are noise or anti-aliasing debris
MIN_IOU = 0.6  # below it a component still counts as an object, but of shape "unknown"
MAX_ASPECT = 1.5  # every shape is drawn in a square box; a longer component is "unknown" too
COVERAGE = 0.5  # a pixel is foreground when at least half of it is a palette colour
NOISE = 0.15  # coverage below this counts as none when matching shapes
PAD = 3  # pixels around a component that its blurred edges may reach
BLUR = ImageFilter.GaussianBlur(1.0)  # the softer of the two template versions each shape is compared in
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_COLOR_NAMES = list(COLORS)


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Want:
    """One object a prompt asks for: its shape, and its colour and count when the prompt names them."""

    shape: str
    color: str | None = None
    count: int | None = None


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    category: str  # one of CATEGORIES
    held_out: bool  # uses a composition never shown in training
    objects: tuple[Want, ...]
    position: str | None = None  # where the single object must sit (shapes.POSITIONS)
    relation: str | None = None  # objects[0] `relation` objects[1] (shapes.RELATIONS)
    background: str | None = None  # named in the prompt for variety; not checked


def is_held_out_relation(first: str, relation: str, second: str) -> bool:
    """Whether `first relation second`, or its mirror image, is held out of training."""
    mirror = (second, _MIRROR[relation], first)
    return (first, relation, second) in HELD_OUT_RELATIONS or mirror in HELD_OUT_RELATIONS


def _np(color: str | None, shape: str) -> str:
    """'a red circle', 'an orange star', 'a cross'."""
    words = f"{color} {shape}" if color else shape
    return ("an " if words[0] in "aeiou" else "a ") + words


def build_prompts(seed: int = PROMPT_SEED) -> list[EvalPrompt]:
    """The ShapeEval prompt set (about 25 per category), fixed by `seed`."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    seen_pairs = [p for p in pairs if p not in HELD_OUT_PAIRS]
    held_pairs = sorted(HELD_OUT_PAIRS)
    out: list[EvalPrompt] = []

    # Only six shapes exist, so the background suffix of the training captions adds variety.
    for s in SHAPES:
        for bg in (None, *BACKGROUNDS):
            text = _np(None, s) + (f" on a {bg} background" if bg else "")
            out.append(EvalPrompt(text, "single_object", False, (Want(s, count=1),), background=bg))

    for s1, s2 in rng.sample([(a, b) for a in SHAPES for b in SHAPES if a != b], 24):
        out.append(EvalPrompt(f"{_np(None, s1)} and {_np(None, s2)}", "two_object", False, (Want(s1), Want(s2))))

    for s in SHAPES:
        for n in (1, 2, 3):
            text = f"{NUMBERS[n]} {s if n == 1 else PLURALS[s]}"
            out.append(EvalPrompt(text, "counting", False, (Want(s, count=n),)))
    for c, s in rng.sample(seen_pairs, 6):
        n = rng.choice((2, 3))
        out.append(EvalPrompt(f"{NUMBERS[n]} {c} {PLURALS[s]}", "counting", False, (Want(s, c, n),)))

    for c, s in rng.sample(seen_pairs, 20) + held_pairs:
        out.append(EvalPrompt(_np(c, s), "colors", (c, s) in HELD_OUT_PAIRS, (Want(s, c),)))

    # Position: a few single objects in a named region, and a majority of relations (GenEval's kind).
    for i, (c, s) in enumerate(rng.sample(seen_pairs, 8) + rng.sample(held_pairs, 2)):
        pos = POSITIONS[i % len(POSITIONS)]
        text = f"{_np(c, s)} {POSITION_PHRASES[pos]}"
        out.append(EvalPrompt(text, "position", (c, s) in HELD_OUT_PAIRS, (Want(s, c),), position=pos))
    triples = [(a, r, b) for a in SHAPES for r in RELATIONS for b in SHAPES if a != b]
    seen_triples = [t for t in triples if not is_held_out_relation(*t)]
    held_triples = [t for t in triples if is_held_out_relation(*t)]
    for a, r, b in rng.sample(seen_triples, 12) + rng.sample(held_triples, 4):
        text = f"{_np(None, a)} {RELATION_PHRASES[r]} {_np(None, b)}"
        out.append(EvalPrompt(text, "position", is_held_out_relation(a, r, b), (Want(a), Want(b)), relation=r))

    # Colour binding: distinct shapes and distinct colours, so swapped attributes fail.
    def binding(first_pool, n, held):
        made = 0
        while made < n:
            (c1, s1), (c2, s2) = rng.choice(first_pool), rng.choice(seen_pairs)
            if held and rng.random() < 0.5:
                (c1, s1), (c2, s2) = (c2, s2), (c1, s1)
            text = f"{_np(c1, s1)} and {_np(c2, s2)}"
            if s1 == s2 or c1 == c2 or any(p.prompt == text for p in out):
                continue
            out.append(EvalPrompt(text, "color_attr", held, (Want(s1, c1), Want(s2, c2))))
            made += 1

    binding(seen_pairs, 18, held=False)
    binding(held_pairs, 6, held=True)
    return out


PROMPTS: list[EvalPrompt] = build_prompts()


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    shape: str  # one of shapes.SHAPES, or "unknown" when no template fits well
    color: str
    cx: float  # centre of the bounding box in pixels, like ShapeObject.cx
    cy: float
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive
    iou: float  # soft IoU with the best template


def _classify(rgb: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's coverage by each palette colour (H, W, K), and its palette index or -1 (H, W).

    Edge pixels blend an object's colour with the background (red on white
    looks pink), so each pixel is matched to the segment background -> colour,
    not to the bare colour: the closest segment names the colour, and the
    position along it (alpha, the coverage) decides foreground.
    """
    d = _PALETTE - bg  # (K, 3)
    v = rgb - bg  # (H, W, 3)
    alpha = np.clip(v @ d.T / np.maximum((d * d).sum(1), 1.0), 0.0, 1.0)  # (H, W, K)
    resid = np.linalg.norm(v[..., None, :] - alpha[..., None] * d, axis=-1)  # (H, W, K)
    best = resid.argmin(-1)  # (H, W)
    cover = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W)
    return alpha, np.where(cover >= COVERAGE, best, -1)


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels; -1 elsewhere.

    Min-label propagation: every pixel starts with its own index and takes the
    smallest index among same-label neighbours until nothing changes; pointer
    jumping (a pixel adopts its label's label) makes that take few rounds.
    """
    h, w = labels.shape
    comp = np.where(labels >= 0, np.arange(h * w).reshape(h, w), -1)  # (H, W)
    across = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)  # (H, W-1) joins x and x+1
    down = (labels[1:] == labels[:-1]) & (labels[1:] >= 0)  # (H-1, W) joins y and y+1
    fg = labels >= 0
    while True:
        before = comp.copy()
        for a, b, join in ((comp[:, 1:], comp[:, :-1], across), (comp[1:], comp[:-1], down)):
            m = np.minimum(a, b)[join]  # a and b are views of comp: this writes through
            a[join] = np.minimum(a[join], m)
            b[join] = np.minimum(b[join], m)
        comp[fg] = comp.ravel()[comp[fg]]
        if np.array_equal(before, comp):
            return comp


@lru_cache(maxsize=None)
def _shape_stats(shape: str) -> tuple[float, float, float]:
    """The fraction of its box a shape fills, and its centroid as fractions of the box."""
    m = np.asarray(shape_mask(shape, 256, 256), dtype=np.float64) / 255  # (256, 256)
    ys, xs = (np.mgrid[0:256, 0:256] + 0.5) / 256  # (2, 256, 256)
    return m.mean(), (xs * m).sum() / m.sum(), (ys * m).sum() / m.sum()


def _soft_template(shape: str, box: tuple[float, float, float, float], width: int, height: int) -> Image.Image:
    """The shape over `box` in a width x height window, anti-aliased like shapes.render()."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    x0, y0, x1, y1 = box
    ImageDraw.Draw(img).polygon(polygon(shape, (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1)), fill=255)
    return img.resize((width, height), Image.BOX)


def _shape_of(cover: np.ndarray) -> tuple[str, float]:
    """The shape whose template best matches a coverage map (soft IoU), and that IoU.

    Blur keeps an object's mass and centroid but eats thin parts (a star's
    tips), so each template is placed by those two moments rather than by the
    thresholded bounding box, and compared sharp and blurred.
    """
    h, w = cover.shape
    mass = cover.sum()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # (2, h, w) pixel centres
    mx, my = (xs * cover).sum() / mass, (ys * cover).sum() / mass
    scores = {}
    for shape in SHAPES:
        fill, fx, fy = _shape_stats(shape)
        side = math.sqrt(mass / fill)
        x0, y0 = mx - fx * side, my - fy * side
        sharp = _soft_template(shape, (x0, y0, x0 + side, y0 + side), w, h)
        for template in (sharp, sharp.filter(BLUR)):
            t = np.asarray(template, dtype=np.float32) / 255  # (h, w)
            iou = np.minimum(cover, t).sum() / np.maximum(cover, t).sum()
            scores[shape] = max(scores.get(shape, 0.0), iou)
    shape = max(scores, key=scores.get)
    return (shape if scores[shape] >= MIN_IOU else "unknown"), float(scores[shape])


def detect(image: Image.Image) -> list[Detection]:
    """The objects in an image of the shapes world, largest first.

    The background is the median border colour; pixels are labelled with a
    palette colour (or background), split into connected components per
    colour, components under MIN_AREA are dropped as noise, and each is named
    by its best-matching shape template. Images of another size are resized
    to shapes.IMAGE_SIZE, the scale the thresholds and position_of assume.
    """
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    rgb = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    # Objects keep off the border; the median (not the mode) tolerates a generated image's noise.
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4H-4, 3)
    alpha, labels = _classify(rgb, np.median(border, axis=0))  # (H, W, K), (H, W)
    comp = _components(labels)  # (H, W)

    areas = np.bincount(comp[comp >= 0])
    found = []
    for cid in np.flatnonzero(areas >= MIN_AREA):
        ys, xs = np.nonzero(comp == cid)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        k = labels[ys[0], xs[0]]
        # A window around the component, holding only its colour's coverage, for the soft template match.
        wx0, wy0 = max(x0 - PAD, 0), max(y0 - PAD, 0)
        wx1, wy1 = min(x1 + PAD, IMAGE_SIZE), min(y1 + PAD, IMAGE_SIZE)
        cover = alpha[wy0:wy1, wx0:wx1, k].copy()  # (h, w)
        others = comp[wy0:wy1, wx0:wx1]
        cover[((others >= 0) & (others != cid)) | (cover < NOISE)] = 0
        shape, iou = _shape_of(cover)
        if max(x1 - x0, y1 - y0) > MAX_ASPECT * min(x1 - x0, y1 - y0):
            shape = "unknown"
        box = (int(x0), int(y0), int(x1), int(y1))
        found.append(Detection(shape, _COLOR_NAMES[k], (x0 + x1) / 2, (y0 + y1) / 2, int(areas[cid]), box, iou))
    return sorted(found, key=lambda d: -d.area)


# --------------------------------------------------------------------------- checking


def _matching(found: list[Detection], want: Want) -> list[Detection]:
    return [d for d in found if d.shape == want.shape and want.color in (None, d.color)]


def satisfies(found: list[Detection], prompt: EvalPrompt) -> bool:
    """Whether detected objects satisfy a prompt, by the rule of its category."""
    if prompt.category == "single_object":
        return len(found) == 1 and found[0].shape == prompt.objects[0].shape
    if prompt.category == "counting":
        want = prompt.objects[0]
        of_shape = [d for d in found if d.shape == want.shape]
        return len(of_shape) == want.count and all(want.color in (None, d.color) for d in of_shape)
    matches = [_matching(found, w) for w in prompt.objects]
    if not all(matches):
        return False
    if prompt.relation:
        pairs = [(a, b) for a in matches[0] for b in matches[1] if a is not b]
        return any(relation_holds((a.cx, a.cy), (b.cx, b.cy), prompt.relation) for a, b in pairs)
    if prompt.position:
        return any(position_of(d.cx, d.cy) == prompt.position for d in matches[0])
    return True


def check(image: Image.Image, prompt: EvalPrompt) -> bool:
    """Whether a generated image satisfies an evaluation prompt."""
    return satisfies(detect(image), prompt)


# --------------------------------------------------------------------------- ground truth


def _any_color(rng: random.Random, shape: str) -> str:
    return rng.choice([c for c in COLORS if (c, shape) not in HELD_OUT_PAIRS])


def _clearly_at(obj: ShapeObject, position: str) -> bool:
    # A pixel of slack: detected centres are bounding-box centres on the pixel grid.
    return all(position_of(obj.cx + dx, obj.cy + dy) == position for dx in (-1, 0, 1) for dy in (-1, 0, 1))


def ground_truth_scene(prompt: EvalPrompt, seed: int) -> Scene:
    """A scene that satisfies `prompt`, fixed by `seed`; colours the prompt leaves open are drawn at random."""
    rng = random.Random(f"{prompt.prompt}/{seed}")  # str seeds are stable across runs
    bg = prompt.background or rng.choice(list(BACKGROUNDS))
    specs = [(w.shape, w.color or _any_color(rng, w.shape), None) for w in prompt.objects]

    if prompt.relation:
        objs, kind = _place_relation(rng, specs[0], specs[1], prompt.relation), "relation"
    elif prompt.position:
        # The training regions (shapes._region) reach past position_of's borders; keep to the common part.
        for _ in range(1000):
            obj = _object(rng, *specs[0], prompt.position)
            if _clearly_at(obj, prompt.position):
                break
        else:
            raise RuntimeError(f"could not place {prompt.prompt!r} (seed {seed})")
        objs, kind = (obj,), "single"
    elif prompt.category == "counting":
        shape, color, _ = specs[0]
        objs, kind = _scatter(rng, [(shape, color, "small")] * prompt.objects[0].count), "count"
    else:
        objs, kind = _scatter(rng, specs), "single" if len(specs) == 1 else "pair"
    return Scene(tuple(objs), bg, prompt.prompt, kind, relation=prompt.relation, position=prompt.position)


def ground_truth_accuracy(n_per_prompt: int = 4, prompts: Sequence[EvalPrompt] | None = None,
                          through: Callable[[list[Image.Image]], list[Image.Image]] | None = None) -> dict[str, float]:
    """The checker's accuracy on renders that satisfy each prompt (should be 1.0).

    `through` changes the renders before they are checked (e.g. a VAE's encode and decode: then this is the
    best score any generator of that VAE's latents can reach). Returns per-category accuracy plus "overall"
    and "held_out", as EvalReport.to_dict().
    """
    prompts = PROMPTS if prompts is None else list(prompts)
    by_text = {p.prompt: p for p in prompts}

    def generate(texts, seeds):
        renders = [render(ground_truth_scene(by_text[t], s)) for t, s in zip(texts, seeds)]
        return through(renders) if through is not None else renders

    return evaluate(generate, prompts, seeds=range(n_per_prompt)).to_dict()


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Result:
    prompt: EvalPrompt
    seed: int
    passed: bool
    found: tuple[Detection, ...] = ()  # what the checker saw: why an image failed


def _mean(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else math.nan


@dataclass
class EvalReport:
    """Outcome of `evaluate`: one Result (and image) per prompt and seed."""

    results: list[Result]
    images: list[Image.Image] = field(repr=False)

    @property
    def per_category(self) -> dict[str, float]:
        cats = [c for c in CATEGORIES if any(r.prompt.category == c for r in self.results)]
        return {c: _mean(r.passed for r in self.results if r.prompt.category == c) for c in cats}

    @property
    def overall(self) -> float:
        """Mean over categories, as GenEval reports it."""
        return _mean(self.per_category.values()) if self.per_category else math.nan

    @property
    def held_out(self) -> float:
        """Accuracy on prompts whose compositions training never showed (nan if none)."""
        return _mean(r.passed for r in self.results if r.prompt.held_out)

    @property
    def held_in(self) -> float:
        """Accuracy on the other prompts of the categories that have held-out ones: the yardstick for held_out."""
        cats = {r.prompt.category for r in self.results if r.prompt.held_out}
        return _mean(r.passed for r in self.results if r.prompt.category in cats and not r.prompt.held_out)

    @property
    def per_prompt(self) -> dict[str, float]:
        """Fraction of seeds that passed, per prompt text."""
        texts = dict.fromkeys(r.prompt.prompt for r in self.results)
        return {t: _mean(r.passed for r in self.results if r.prompt.prompt == t) for t in texts}

    def to_dict(self) -> dict[str, float]:
        return {**self.per_category, "overall": self.overall, "held_out": self.held_out}

    def table(self) -> str:
        """A text table: category, number of prompts, accuracy; then overall, held-out and held-in lines."""
        prompts = list({r.prompt: None for r in self.results})
        held_cats = {p.category for p in prompts if p.held_out}
        rows = [(c, sum(p.category == c for p in prompts), a) for c, a in self.per_category.items()]
        rows += [
            ("overall", len(prompts), self.overall),
            ("held-out", sum(p.held_out for p in prompts), self.held_out),
            ("held-in", sum(p.category in held_cats and not p.held_out for p in prompts), self.held_in),
        ]
        lines = [f"{'category':<14}{'prompts':>8}{'accuracy':>10}"]
        lines += [f"{c:<14}{n:>8}{a:>10.3f}" for c, n, a in rows]
        lines.insert(1 + len(self.per_category), "-" * 32)  # between the categories and the summary lines
        return "\n".join(lines)

    def grid(self, path, columns: int | None = None) -> None:
        """Save every sample as a grid PNG, one row per prompt by default, framed green (pass) or red (fail)."""
        columns = columns or len({r.seed for r in self.results}) or 1
        save_grid(self.images, path, columns, passed=[r.passed for r in self.results])


def save_grid(images: Sequence[Image.Image], path, columns: int = 8, passed: Sequence[bool] | None = None) -> None:
    """Write images as a grid PNG; with `passed`, each is framed green or red."""
    if not images:
        raise UsageError("save_grid got no images; pass at least one")
    w, h = images[0].size
    pad = 2
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images):
        x, y = pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)
        canvas.paste(img.convert("RGB").resize((w, h)), (x, y))
        if passed is not None:
            draw.rectangle((x - 1, y - 1, x + w, y + h), outline=(40, 200, 60) if passed[i] else (220, 40, 40))
    canvas.save(path)


def evaluate(
    generate: Callable[[list[str], list[int]], Sequence[Image.Image]],
    prompts: Sequence[EvalPrompt] | None = None,
    seeds: Iterable[int] = (0, 1, 2, 3),
    batch: int = 16,
) -> EvalReport:
    """Score a text-to-image model on ShapeEval.

    `generate(prompts, seeds)` returns one image per (prompt, seed) pair; it is
    called with at most `batch` pairs at a time, so this module needs no
    pipeline code.
    """
    if batch < 1:
        raise UsageError(f"batch must be at least 1, got {batch}")
    prompts, seeds = (PROMPTS if prompts is None else list(prompts)), list(seeds)
    jobs = [(p, s) for p in prompts for s in seeds]
    images: list[Image.Image] = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        out = list(generate([p.prompt for p, _ in chunk], [s for _, s in chunk]))
        if len(out) != len(chunk):
            raise UsageError(f"generate returned {len(out)} images for {len(chunk)} prompts; return one per prompt")
        images += out
    found = [tuple(detect(img)) for img in images]
    results = [Result(p, s, satisfies(list(f), p), f) for (p, s), f in zip(jobs, found)]
    return EvalReport(results, images)
