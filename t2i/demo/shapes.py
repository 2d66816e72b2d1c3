"""The shapes world: a procedural renderer of small captioned scenes.

It is the data the bundled demo model `t2i-shapes` is trained on and the world
ShapeEval (`t2i.shapeeval`) measures it in. Everything is deterministic from a
seed: `sample_scene(seed)` always returns the same scene and caption, and
`render(scene)` always the same pixels.

A scene holds 1 to 3 objects on a plain background. Each object has a shape,
one of eight named colours, a size and a centre. Captions are built from
templates that name the parts of the scene a prompt would ask about: the
shapes, their colours, their count, where a single object sits, and how two
objects are placed relative to each other.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth, deterministic edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 15),
    "yellow": (240, 225, 30),
    "green": (30, 160, 50),
    "cyan": (30, 205, 215),
    "blue": (35, 65, 225),
    "purple": (135, 40, 185),
    "pink": (250, 140, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "white": (245, 245, 245),
}
SIZES = {"small": (12, 16), "big": (24, 30)}
MEDIUM = (16, 22)  # size range for objects whose size the caption does not name

POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}  # four: only with SceneMix.four

# Compositions never shown in training: ShapeEval's held-out prompts use them
# to measure generalisation rather than recall.
HELD_OUT_PAIRS = frozenset(
    {("purple", "star"), ("green", "heart"), ("orange", "triangle"), ("cyan", "square")}
)
HELD_OUT_RELATIONS = frozenset(
    {
        ("triangle", "left of", "heart"),
        ("circle", "above", "cross"),
        ("star", "right of", "square"),
        ("heart", "below", "circle"),
    }
)
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

PREFIXES = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a render of ")
SYNONYMS = {"square": ("square", "box"), "cross": ("cross", "plus")}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: int  # side of the object's bounding box in pixels
    cx: float  # centre, pixels
    cy: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    caption: str
    kind: str = "single"  # single | count | pair | relation | triple
    relation: str | None = None  # for kind == "relation": objects[0] REL objects[1]
    position: str | None = None  # for a single object placed where the caption says
    meta: dict = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------- geometry


def _normalise(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is exactly [-1, 1] x [-1, 1]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in points]


def _star() -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.42
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return _normalise(pts)


def _heart() -> list[tuple[float, float]]:
    pts = []
    for i in range(64):
        t = 2 * math.pi * i / 64
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))  # image y grows downwards
    return _normalise(pts)


def _cross() -> list[tuple[float, float]]:
    w = 0.36
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _circle() -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * i / 96), math.sin(2 * math.pi * i / 96)) for i in range(96)]


POLYGONS: dict[str, list[tuple[float, float]]] = {
    "circle": _circle(),
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
}


def polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The shape's outline stretched over `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / 2, (y1 - y0) / 2
    return [(x0 + (x + 1) * sx, y0 + (y + 1) * sy) for x, y in POLYGONS[shape]]


def shape_mask(shape: str, width: int, height: int) -> Image.Image:
    """A binary ("L") mask of `shape` filling a width x height box, drawn like render()."""
    s = SUPERSAMPLE
    img = Image.new("L", (width * s, height * s), 0)
    ImageDraw.Draw(img).polygon(polygon(shape, (0, 0, width * s - 1, height * s - 1)), fill=255)
    return img.resize((width, height), Image.BOX)


# --------------------------------------------------------------------------- rendering


def fill(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], color: tuple[int, int, int], scale: float):
    """How the world paints an object: a filled polygon."""
    draw.polygon(points, fill=color)


def render(scene: Scene, size: int = IMAGE_SIZE, paint=fill) -> Image.Image:
    """Draw a scene as an RGB image of `size` x `size` pixels; `paint` draws one object (styles swap it)."""
    s = SUPERSAMPLE * size / IMAGE_SIZE
    big = Image.new("RGB", (round(size * SUPERSAMPLE), round(size * SUPERSAMPLE)), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        paint(draw, polygon(obj.shape, (x0 * s, y0 * s, x1 * s - 1, y1 * s - 1)), COLORS[obj.color], s)
    return big.resize((size, size), Image.BOX)


# --------------------------------------------------------------------------- placement


def _region(position: str | None) -> tuple[float, float, float, float]:
    """Where a centre may fall, as (x_min, x_max, y_min, y_max) fractions of the image."""
    return {
        None: (0.0, 1.0, 0.0, 1.0),
        # The side bands are narrow across so the main axis always dominates, which is
        # how position_of (and so ShapeEval) reads a position.
        "left": (0.0, 0.3, 0.35, 0.65),
        "right": (0.7, 1.0, 0.35, 0.65),
        "top": (0.35, 0.65, 0.0, 0.3),
        "bottom": (0.35, 0.65, 0.7, 1.0),
        "center": (0.42, 0.58, 0.42, 0.58),
    }[position]


def _place(rng: random.Random, size: int, position: str | None = None) -> tuple[float, float]:
    half, margin = size / 2, 2
    lo, hi = half + margin, IMAGE_SIZE - half - margin
    fx0, fx1, fy0, fy1 = _region(position)
    x = rng.uniform(max(lo, fx0 * IMAGE_SIZE), min(hi, max(lo, fx1 * IMAGE_SIZE)))
    y = rng.uniform(max(lo, fy0 * IMAGE_SIZE), min(hi, max(lo, fy1 * IMAGE_SIZE)))
    return x, y


def _overlaps(a: ShapeObject, b: ShapeObject, gap: float = 3) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether centre a stands in `relation` to centre b: the main axis dominates."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if relation == "left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}; use one of {', '.join(RELATIONS)}")


def position_of(cx: float, cy: float) -> str | None:
    """The named region a centre lies in, or None between regions (ShapeEval's reading)."""
    f = IMAGE_SIZE
    if abs(cx - f / 2) < 0.16 * f and abs(cy - f / 2) < 0.16 * f:
        return "center"
    dx, dy = cx - f / 2, cy - f / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < -0.12 * f else "right" if dx > 0.12 * f else None
    return "top" if dy < -0.12 * f else "bottom" if dy > 0.12 * f else None


# --------------------------------------------------------------------------- scenes


def _object(rng, shape, color, size_word, position=None) -> ShapeObject:
    lo, hi = SIZES[size_word] if size_word else MEDIUM
    size = rng.randint(lo, hi)
    return ShapeObject(shape, color, size, *_place(rng, size, position))


def _scatter(rng, specs, max_tries=200):
    """Place objects (shape, color, size_word) at random without overlap."""
    for _ in range(max_tries):
        objs = [_object(rng, *spec) for spec in specs]
        if all(not _overlaps(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            return objs
    # Crowded: shrink everything and retry; always terminates.
    return _scatter(rng, [(s, c, "small") for s, c, _ in specs], max_tries)


def _place_relation(rng, first, second, relation):
    """Two objects with `first` standing in `relation` to `second`, unambiguously."""
    while True:
        a, b = _scatter(rng, [first, second])
        if relation_holds((a.cx, a.cy), (b.cx, b.cy), relation):
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            if max(dx, dy) > 1.6 * min(dx, dy) + 6:
                return a, b


def _allowed_pair(rng, shape=None, color=None, held_out_ok=False):
    while True:
        s = shape or rng.choice(SHAPES)
        c = color or rng.choice(list(COLORS))
        if held_out_ok or (c, s) not in HELD_OUT_PAIRS:
            return s, c
        shape = color = None  # the asked-for pair is held out; draw a fresh one


def _word(rng, shape, plural=False):
    w = rng.choice(SYNONYMS[shape]) if shape in SYNONYMS and rng.random() < 0.2 else shape
    if plural:
        return "crosses" if w == "cross" else "boxes" if w == "box" else w + "es" if w == "plus" else w + "s"
    return w


def _np(rng, obj, with_color=True, with_size=False):
    """A noun phrase for one object: 'a big red circle'."""
    parts = []
    if with_size:
        parts.append("small" if obj.size <= SIZES["small"][1] else "big")
    if with_color:
        parts.append(obj.color)
    parts.append(_word(rng, obj.shape))
    return ("an " if parts[0][0] in "aeiou" else "a ") + " ".join(parts)


def _finish(rng, text, background):
    text = rng.choice(PREFIXES) + text
    if rng.random() < 0.25:
        text += f" on a {background} background"
    return text


@dataclass(frozen=True)
class SceneMix:
    """How often each kind of scene is drawn (relative weights), the share of captions that name no colour,
    and the share of counting scenes drawn with four objects.

    The default is demo.toml's (the bundled model's legs up to step 15800 trained on it); a training config
    can lean it (its `[scenes]` table), e.g. towards counting. Seeds keep their meaning: each scene draws the same random numbers
    in the same order, so a mix changes which kind a seed picks, never how a kind is drawn (`four` > 0 alone
    adds a draw to counting scenes). Four objects go beyond the world's 1 to 3 and ShapeEval never asks for
    them: they are a contrast class, so that "three" is not simply the most objects a caption can ask for.
    """

    single: float = 30.0
    count: float = 15.0
    pair: float = 20.0
    relation: float = 25.0
    triple: float = 10.0
    colorless: float = 0.15
    four: float = 0.0

    def kinds(self) -> dict[str, float]:
        return {"single": self.single, "count": self.count, "pair": self.pair, "relation": self.relation,
                "triple": self.triple}

    def problem(self) -> str | None:
        """What is wrong with this mix, in words, or None."""
        weights = self.kinds()
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            return f"scene weights must be >= 0 with a positive sum, not {weights}"
        if not 0 <= self.colorless <= 1:
            return f"scenes.colorless is a share of captions, between 0 and 1, not {self.colorless:g}"
        if not 0 <= self.four <= 1:
            return f"scenes.four is a share of counting scenes, between 0 and 1, not {self.four:g}"
        return None


def sample_scene(seed: int, held_out_ok: bool = False, mix: SceneMix = SceneMix()) -> Scene:
    """The training distribution: a random scene and caption, fixed by `seed` (and `mix`).

    Held-out compositions (HELD_OUT_PAIRS, HELD_OUT_RELATIONS) never appear
    unless `held_out_ok` is set.
    """
    rng = random.Random(seed)
    bg = rng.choice(list(BACKGROUNDS))
    weights = mix.kinds()
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    colorless = rng.random() < mix.colorless

    if kind == "single":
        shape, color = _allowed_pair(rng, held_out_ok=held_out_ok)
        size_word = rng.choice([None, None, "small", "big"])
        position = rng.choice([None, None, *POSITIONS])
        obj = _object(rng, shape, color, size_word, position)
        text = _np(rng, obj, with_color=not colorless, with_size=size_word is not None)
        if position:
            text += " " + POSITION_PHRASES[position]
        return Scene((obj,), bg, _finish(rng, text, bg), kind, position=position)

    if kind == "count":
        n = rng.choice([1, 2, 2, 3, 3])
        if mix.four and rng.random() < mix.four:
            n = 4
        shape, color = _allowed_pair(rng, held_out_ok=held_out_ok)
        objs = _scatter(rng, [(shape, color, "small")] * n)
        num = NUMBERS[n] if rng.random() < 0.85 else str(n)
        text = f"{num} {'' if colorless else color + ' '}{_word(rng, shape, plural=n > 1)}"
        return Scene(tuple(objs), bg, _finish(rng, text, bg), kind)

    if kind == "triple":
        specs = []
        for _ in range(3):
            s, c = _allowed_pair(rng, held_out_ok=held_out_ok)
            specs.append((s, c, None))
        objs = _scatter(rng, specs)
        nps = [_np(rng, o, with_color=not colorless) for o in objs]
        return Scene(tuple(objs), bg, _finish(rng, f"{nps[0]}, {nps[1]} and {nps[2]}", bg), kind)

    # Two distinct objects: either just named together, or placed by a relation.
    while True:
        s1, c1 = _allowed_pair(rng, held_out_ok=held_out_ok)
        s2, c2 = _allowed_pair(rng, held_out_ok=held_out_ok)
        if (s1, c1) == (s2, c2):
            continue
        relation = rng.choice(RELATIONS) if kind == "relation" else None
        if relation and not held_out_ok:
            if (s1, relation, s2) in HELD_OUT_RELATIONS or (s2, _MIRROR[relation], s1) in HELD_OUT_RELATIONS:
                continue
        break
    if relation:
        a, b = _place_relation(rng, (s1, c1, None), (s2, c2, None), relation)
        text = f"{_np(rng, a, not colorless)} {RELATION_PHRASES[relation]} {_np(rng, b, not colorless)}"
        return Scene((a, b), bg, _finish(rng, text, bg), kind, relation=relation)
    a, b = _scatter(rng, [(s1, c1, None), (s2, c2, None)])
    return Scene((a, b), bg, _finish(rng, f"{_np(rng, a, not colorless)} and {_np(rng, b, not colorless)}", bg), kind)


# What a caption's trailing extra phrase is made of (unet.caption_extras): the shape of LoRA triggers and style
# tags ("in sks style", "by xyz", "qzv art"), with words that are no caption word, so nothing it says is a
# colour, shape, count, position or background.
_EXTRA_TEMPLATES = ("{}", "{} {}", "in {} style", "{} style", "by {}", "{} art", "{}, {}")
_EXTRA_WORDS = ("style", "art", "artwork", "detailed", "masterpiece", "painting", "sketch", "lora",
                "trending", "quality", "best", "vivid", "cinematic", "pixel", "pastel", "mosaic", "outline", "flat")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def extra_phrase(rng: random.Random) -> str:
    """A phrase of words no caption uses, shaped like a LoRA trigger or style tag (`rng` decides it)."""
    def word() -> str:
        while True:
            w = rng.choice(_EXTRA_WORDS) if rng.random() < 0.4 else "".join(
                rng.choice(_LETTERS) for _ in range(rng.randint(2, 7)))
            if w not in _CAPTION_WORDS:
                return w

    template = rng.choice(_EXTRA_TEMPLATES)
    return template.format(*(word() for _ in range(template.count("{}"))))


def caption_words() -> list[str]:
    """Every word a caption or ShapeEval prompt can contain (for building the tokenizer)."""
    words = set(SHAPES) | set(PLURALS.values()) | set(COLORS) | set(BACKGROUNDS) | set(SIZES)
    words |= {"box", "boxes", "plus", "pluses", "background", "and", "a", "an", "on", "the", "of", "to", "at", "in"}
    words |= {"picture", "image", "drawing", "render", "photo", "left", "right", "top", "bottom", "center", "above"}
    words |= {"below", "one", "two", "three", "four", "1", "2", "3", "4", ","}
    return sorted(words)


_CAPTION_WORDS = frozenset(caption_words())
