"""X/Y/Z grids (A1111's "X/Y/Z plot"): one image per combination of axis values, drawn into one labelled PNG.

    axes = [grid.parse_axis("steps=10-30 (+10)", "--x"), grid.parse_axis("sampler=Euler a,DPM++ 2M", "--y")]
    cells = grid.plan(jobs.Request(["a red circle"], seed=1), axes)  # every cell checked, nothing loaded
    for cell in grid.run(cells):  # sets cell.result; each model loads once (a Checkpoint axis: several)
        print(cell.index)
    image, layout = grid.draw(cells, axes)

Each cell is an ordinary request through `t2i.jobs` (checked whole before any model loads), so its image is the
one `t2i generate` makes with the same settings, with its own metadata. An axis sets one field of
`jobs.Request` through the AXES table: a new setting is one line there.

With a Z axis the grid is one image: a sub-grid per Z value, side by side under its Z label (as A1111 does).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from t2i.errors import UsageError

MAX_CELLS = 1000
MAX_PIXELS = 200_000_000  # the grid image (A1111's default img_max_size_mp is 200)


def _set(name: str) -> Callable:
    """An axis that sets one field of the request."""
    return lambda request, value, values: {name: value}


def _prompt_sr(request, value: str, values: list) -> dict:
    """A1111's Prompt S/R: the axis's first value is searched for, each value replaces it (prompt and negative)."""
    prompts = [p.replace(values[0], value) for p in request.prompts]
    negative = request.negative_prompt.replace(values[0], value) if request.negative_prompt else request.negative_prompt
    return {"prompts": prompts, "negative_prompt": negative}


def _lora_scale(request, value: float, values: list) -> dict:
    """The scale of every --lora (a <lora:NAME:W> tag in the prompt is a Prompt S/R's)."""
    from t2i.lora import parse_lora_arg  # deferred: the LoRA code imports torch; `t2i --help` must not

    specs = [parse_lora_arg(x) if isinstance(x, str) else x for x in request.loras]
    return {"loras": [dataclasses.replace(s, scale=value) for s in specs]}


OWN_VAE = ("none", "automatic")  # A1111's VAE axis values for the model's own VAE


def _vae(request, value: str, values: list) -> dict:
    """A VAE as --vae takes it (a folder, a file, a name in --vae-dir); None/Automatic: the model's own."""
    return {"vae": None if value.strip().lower() in OWN_VAE else value}


def _hires(name: str) -> Callable:
    """An axis that sets one field of the hires fix, turning it on (the other fields: the --hires-* flags', or
    their defaults)."""

    def apply(request, value, values):
        from t2i.pipelines.hires import Hires  # deferred: torch; --help must not import it

        return {"hires": dataclasses.replace(request.hires or Hires(), **{name: value})}

    return apply


def _file_name(value: str) -> str:
    """A path's last part, as A1111 labels checkpoints and VAEs by name ("None" and names stay as given)."""
    return re.split(r"[\\/]", str(value).rstrip("/\\"))[-1] or str(value)


@dataclass(frozen=True)
class Axis:
    name: str  # t2i's name, as --x takes it
    label: str  # A1111's name (also taken), and the label drawn on the grid
    kind: type  # int | float | str: how values are read (int and float take ranges)
    apply: Callable[[Any, Any, list], dict]  # (request, value, all values) -> the request's changed fields
    aliases: tuple[str, ...] = ()
    show: Callable[[Any], str] = str  # a str value's label on the grid


# One line per setting: the fields are jobs.Request's.
AXES: dict[str, Axis] = {a.name: a for a in [
    Axis("seed", "Seed", int, _set("seed")),
    Axis("steps", "Steps", int, _set("steps")),
    Axis("cfg", "CFG Scale", float, _set("guidance"), ("guidance",)),
    Axis("sampler", "Sampler", str, _set("sampler")),
    Axis("scheduler", "Schedule type", str, _set("scheduler"), ("schedule",)),
    Axis("clip-skip", "Clip skip", int, _set("clip_skip")),
    Axis("width", "Width", int, _set("width")),
    Axis("height", "Height", int, _set("height")),
    Axis("autoguidance", "Autoguidance", float, _set("autoguidance")),
    Axis("negative-prompt", "Negative prompt", str, _set("negative_prompt")),
    Axis("prompt-sr", "Prompt S/R", str, _prompt_sr, ("sr",)),
    Axis("lora-scale", "LoRA scale", float, _lora_scale),
    # A1111's everyday set (issue 29): checkpoints (each loads once: see `run_order`), VAEs, the hires fix
    Axis("model", "Checkpoint name", str, _set("model"), ("checkpoint",), show=_file_name),
    Axis("vae", "VAE", str, _vae, show=_file_name),
    Axis("hires-scale", "Hires upscale", float, _hires("scale")),
    Axis("hires-steps", "Hires steps", int, _hires("steps")),
    Axis("hires-denoise", "Denoising", float, _hires("denoise"), ("denoising-strength",)),
    Axis("hires-upscaler", "Hires upscaler", str, _hires("upscaler")),
]}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_NAMES = {_key(n): a for a in AXES.values() for n in (a.name, a.label, *a.aliases)}


def find_axis(name: str) -> Axis:
    """An axis by t2i name or A1111 label (case, spaces and punctuation ignored)."""
    axis = _NAMES.get(_key(name))
    if axis is None:
        from t2i.errors import did_you_mean

        hint = did_you_mean(name.lower(), [a.name for a in AXES.values()])
        raise UsageError(f"unknown grid axis {name!r}{f' ({hint})' if hint else ''}; use one of: "
                         f"{', '.join(AXES)} (or A1111's names: {', '.join(a.label for a in AXES.values())})")
    return axis


@dataclass
class AxisValues:
    """An axis of a grid: which setting, its values, and the text they were given as (the grid's metadata)."""

    axis: Axis
    values: list
    text: str
    flag: str = ""  # --x, --y or --z: named in errors

    def labels(self) -> list[str]:
        if self.axis.kind is str:
            return [self.axis.show(v) for v in self.values]
        return [f"{self.axis.label}: {v:g}" if isinstance(v, float) else f"{self.axis.label}: {v}"
                for v in self.values]


_NUMBER = r"[+-]?\s*\d+(?:\.\d*)?"
_RANGE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\(\s*([+-]\s*\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*")


def _expand_range(text: str, kind: type) -> list | None:
    """A1111's ranges: "1-5" (step 1), "10-30 (+10)", "30-10 (-10)", "1-9 [5]" (five evenly spaced); None if
    `text` is not a range."""
    m = _RANGE.fullmatch(text)
    if m is None:
        return None
    start, end = (float(g.replace(" ", "")) for g in m.group(1, 2))
    if kind is int and not (start.is_integer() and end.is_integer()):
        raise UsageError(f"{text.strip()!r} is not a range of whole numbers")
    if m.group(4) is not None:  # [count]
        n = int(m.group(4))
        if n < 1:
            raise UsageError(f"{text.strip()!r}: the count in [...] must be 1 or more")
        values = [start + (end - start) * i / max(n - 1, 1) for i in range(n)]
        return [int(v) for v in values] if kind is int else values
    step = float(m.group(3).replace(" ", "")) if m.group(3) else (1 if end >= start else -1)
    if kind is int and step != int(step):
        raise UsageError(f"{text.strip()!r}: the step of a whole-number range is a whole number")
    if step == 0 or (end - start) * step < 0:
        raise UsageError(f"{text.strip()!r}: the step {step:+g} never reaches {end:g}")
    count = int((end - start) / step + 1e-9) + 1
    if count > MAX_CELLS:
        raise UsageError(f"{text.strip()!r} makes {count} values; a grid has at most {MAX_CELLS} cells")
    values = [start + i * step for i in range(count)]
    return [round(v) for v in values] if kind is int else [round(v, 10) for v in values]


def parse_axis(spec: str, flag: str = "--x") -> AxisValues:
    """ "NAME=V1,V2,..." (values as CSV: quote one that holds a comma; numbers also as ranges) -> AxisValues."""
    name, sep, text = spec.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"{flag} {spec!r}: give NAME=VALUES, e.g. {flag} \"steps=10,20,30\"")
    try:
        axis = find_axis(name.strip())
    except UsageError as e:
        raise UsageError(f"{flag}: {e}") from None
    try:
        raw = [v.strip() for row in csv.reader([text], skipinitialspace=True) for v in row]
    except csv.Error as e:
        raise UsageError(f"{flag} {name.strip()}: the values are not comma-separated ({e})") from None
    raw = [v for v in raw if v]
    if not raw:
        raise UsageError(f"{flag} {name.strip()}: give at least one value after the '='")
    values: list = []
    for v in raw:
        if axis.kind is str:
            values.append(v)
            continue
        try:
            expanded = _expand_range(v, axis.kind)
        except UsageError as e:
            raise UsageError(f"{flag} {axis.name}: {e}") from None
        if expanded is not None:
            values += expanded
            continue
        try:
            values.append(axis.kind(v))
        except ValueError:
            what = "a whole number" if axis.kind is int else "a number"
            raise UsageError(f"{flag} {axis.name} value {v!r} is not {what} (or a range like 1-5, 10-30 (+10))"
                             ) from None
    return AxisValues(axis, values, text.strip(), flag)


@dataclass
class Cell:
    """One image of the grid: its place (x, y, z indices), its checked job, and once run its result."""

    index: tuple[int, int, int]
    job: Any  # jobs.Job
    result: Any = None  # the pipeline's Result: one image and its settings
    paths: list = field(default_factory=list)


def plan(base, axes: list[AxisValues]) -> list[Cell]:
    """Every cell's request checked by `jobs.check` before any model loads, in drawing order (z, y, x).

    Each axis value is first checked alone (the error names the axis: `--y sampler value 'Eulr': unknown
    sampler ...`). A random seed (-1) is fixed once for the whole grid, as A1111 does, so the cells differ by
    their axis values alone; a Seed axis value of -1 is a random seed of its own."""
    from t2i import jobs  # deferred: torch; --help must not import it

    sizes = [len(a.values) for a in axes]
    count = 1
    for n in sizes:
        count *= n
    if count > MAX_CELLS:
        raise UsageError(f"the grid has {' x '.join(map(str, sizes))} = {count} cells; at most {MAX_CELLS}")
    if len(base.prompts) != 1 or base.batch != 1 or base.iterations != 1:
        raise UsageError("a grid makes one image per cell: give one prompt, batch 1, one iteration")
    if base.dynamic_prompts == "combinatorial":
        raise UsageError("a grid makes one image per cell; instead of --combinatorial, give the variants as a "
                         "Prompt S/R axis (--x \"prompt-sr=red,blue\")")
    if base.seed == -1:
        base = dataclasses.replace(base, seed=random.randrange(2**32))
    for a in axes:
        if a.axis.name == "seed":
            a.values = [random.randrange(2**32) if v == -1 else v for v in a.values]
        if a.axis.name == "prompt-sr":
            texts = [*base.prompts, base.negative_prompt or ""]
            if not any(a.values[0] in t for t in texts):
                raise UsageError(f"{a.flag} prompt-sr: {a.values[0]!r} (the first value, the one replaced) is not "
                                 "in the prompt or the negative prompt")
        for v in a.values:
            try:
                jobs.check(dataclasses.replace(base, **a.axis.apply(base, v, a.values)))
            except UsageError as e:
                raise UsageError(f"{a.flag} {a.axis.name} value {v!r}: {e}") from None
    cells = []
    padded = axes + [AxisValues(AXES["seed"], [None], "")] * (3 - len(axes))  # absent axes: one value, no change
    x, y, z = padded
    for (iz, vz), (iy, vy), (ix, vx) in itertools.product(enumerate(z.values), enumerate(y.values),
                                                          enumerate(x.values)):
        request = base
        for a, v in ((x, vx), (y, vy), (z, vz)):
            if v is not None:
                request = dataclasses.replace(request, **a.axis.apply(request, v, a.values))
        cells.append(Cell((ix, iy, iz), jobs.check(request)))
    return cells


def _model(cell: Cell):
    return cell.job.request.model


def run_order(cells: list[Cell]) -> list[Cell]:
    """The cells in the order to make them: grouped by model, each model's cells in drawing order, so that a
    Checkpoint axis loads each model once (A1111 runs its checkpoint axis outermost for the same reason)."""
    first = {}
    for i, c in enumerate(cells):
        first.setdefault(_model(c), i)
    return sorted(cells, key=lambda c: first[_model(c)])


def run(cells: list[Cell], pipe=None, progress=None, load=None) -> Iterator[Cell]:
    """Make every cell (in `run_order`), yielding each once made. `pipe`: an already loaded pipeline of the first
    cell's model; another model is loaded with `load(job)` (default `jobs.load`) when its first cell comes, the
    previous one dropped first."""
    from t2i import jobs  # deferred: torch; --help must not import it

    load = load or jobs.load
    loaded = _model(run_order(cells)[0]) if pipe is not None else object()
    for cell in run_order(cells):
        if _model(cell) != loaded:
            pipe = None  # the previous model's memory goes before the next one loads
            pipe, loaded = load(cell.job), _model(cell)
        run_cell(pipe, cell, progress=progress)
        yield cell


def run_cell(pipe, cell: Cell, progress=None):
    """The cell's image on a loaded pipeline (`jobs.load` of any cell): its job prepared and run, one call."""
    from t2i import jobs  # deferred: torch; --help must not import it

    pipe = jobs.prepare(pipe, cell.job)
    (cell.result,) = jobs.run(pipe, cell.job, progress=progress)  # `plan` made it one call
    return cell.result


# --------------------------------------------------------------------------- the grid image


def _font(cell_w: int, cell_h: int):
    from PIL import ImageFont

    size = max(12, (cell_w + cell_h) // 25)  # A1111's size for 512-pixel cells, legible on small ones
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Words on lines no wider than `width` where they fit (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


@dataclass
class Layout:
    """Where everything goes: cell (cell_w x cell_h) at column x, row y of sub-grid z has its top-left corner at
    `cell_origin(x, y, z)`; `size` is the whole image's."""

    cols: int
    rows: int
    grids: int
    cell_w: int
    cell_h: int
    left: int  # the row labels' width
    top: int  # the column labels' height
    title: int  # the Z label's height
    gap: int  # between sub-grids

    @property
    def sub_w(self) -> int:
        return self.left + self.cols * self.cell_w

    @property
    def size(self) -> tuple[int, int]:
        return (self.grids * self.sub_w + (self.grids - 1) * self.gap,
                self.title + self.top + self.rows * self.cell_h)

    def cell_origin(self, x: int, y: int, z: int) -> tuple[int, int]:
        return z * (self.sub_w + self.gap) + self.left + x * self.cell_w, self.title + self.top + y * self.cell_h


def layout(axes: list[AxisValues], cell_w: int, cell_h: int) -> tuple[Layout, Any, dict]:
    """The grid's layout for cells of this size, its font, and the wrapped label lines per axis."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(cell_w, cell_h)
    line_h = int(sum(font.getmetrics()) * 1.1) + 1
    pad = line_h // 2
    padded = axes + [None] * (3 - len(axes))
    x, y, z = padded
    lines = {
        "x": [_wrap(draw, t, font, cell_w - pad) for t in x.labels()],
        "y": [_wrap(draw, t, font, max(cell_w, 4 * line_h)) for t in y.labels()] if y else [],
        "z": [_wrap(draw, t, font, len(x.values) * cell_w) for t in z.labels()] if z else [],
    }
    top = 2 * pad + line_h * max(len(ls) for ls in lines["x"])
    left = 2 * pad + int(max((draw.textlength(l, font=font) for ls in lines["y"] for l in ls), default=0)) if y else 0
    title = 2 * pad + line_h * max(len(ls) for ls in lines["z"]) if z else 0
    shape = Layout(len(x.values), len(y.values) if y else 1, len(z.values) if z else 1, cell_w, cell_h, left, top,
                   title, 2 * pad if z else 0)
    return shape, font, lines


def draw(cells: list[Cell], axes: list[AxisValues]):
    """The labelled grid of the cells' images (white margins, black labels): X labels above the columns, Y labels
    left of the rows, each Z value's sub-grid side by side under its label. Returns (image, layout)."""
    from PIL import Image, ImageDraw

    images = {c.index: c.result.images[0] for c in cells}
    cell_w = max(im.width for im in images.values())
    cell_h = max(im.height for im in images.values())
    shape, font, lines = layout(axes, cell_w, cell_h)
    grid = Image.new("RGB", shape.size, "white")
    pen = ImageDraw.Draw(grid)
    line_h = int(sum(font.getmetrics()) * 1.1) + 1

    def text(ls: list[str], box: tuple[int, int, int, int]) -> None:  # lines centred in the box
        x0, y0, x1, y1 = box
        y = (y0 + y1 - line_h * len(ls)) // 2
        for line in ls:
            pen.text(((x0 + x1 - pen.textlength(line, font=font)) / 2, y), line, fill="black", font=font)
            y += line_h

    for (ix, iy, iz), im in images.items():
        ox, oy = shape.cell_origin(ix, iy, iz)
        grid.paste(im.convert("RGB"), (ox + (cell_w - im.width) // 2, oy + (cell_h - im.height) // 2))
    for iz in range(shape.grids):
        x0, _ = shape.cell_origin(0, 0, iz)
        for ix, ls in enumerate(lines["x"]):
            text(ls, (x0 + ix * cell_w, shape.title, x0 + (ix + 1) * cell_w, shape.title + shape.top))
        for iy, ls in enumerate(lines["y"]):
            y0 = shape.title + shape.top + iy * cell_h
            text(ls, (x0 - shape.left, y0, x0, y0 + cell_h))
        if lines["z"]:
            text(lines["z"][iz], (x0 - shape.left, 0, x0 + shape.cols * cell_w, shape.title))
    return grid, shape


def check_pixels(axes: list[AxisValues], cell_w: int, cell_h: int) -> None:
    """Refuse a grid image over MAX_PIXELS before any cell is made."""
    w, h = layout(axes, cell_w, cell_h)[0].size
    if w * h > MAX_PIXELS:
        raise UsageError(f"the grid image would be {w}x{h} pixels ({w * h / 1e6:.0f} MP, at most "
                         f"{MAX_PIXELS / 1e6:.0f} MP); use fewer values or a smaller size")


def a1111_fields(axes: list[AxisValues]) -> dict[str, str]:
    """A1111's grid infotext fields: Script, X Type, X Values (and Fixed X Values for a seed axis), Y..., Z..."""
    out = {"Script": "X/Y/Z plot"}
    for letter, a in zip("XYZ", axes):
        out[f"{letter} Type"] = a.axis.label
        out[f"{letter} Values"] = a.text
        if a.axis.name == "seed":
            out[f"Fixed {letter} Values"] = ", ".join(str(v) for v in a.values)
    return out


def json_record(axes: list[AxisValues], cells: list[Cell]) -> dict:
    """The grid's own record in the t2i JSON chunk: its axes (resolved values) and each cell's file."""
    return {"axes": [{"axis": a.axis.name, "values": a.values} for a in axes],
            "cells": [{"index": list(c.index), "files": [str(p) for p in c.paths]} for c in cells]}
