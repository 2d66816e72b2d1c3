"""Generation settings in any tool's image: t2i's, AUTOMATIC1111's (PNG text, JPEG/WebP EXIF), ComfyUI's.

`read(path)` finds what an image says about how it was made, as one `Found`: its settings in
t2i's words (`Params`), plus the text to show. `request_from_image(path, **overrides)` turns
that into a `t2i.jobs.Request` (A1111's "send to txt2img"), with a one-line note for each
setting t2i cannot honour. Nothing here imports torch or diffusers.

A1111's reading rules are kept (its `parse_generation_parameters` and
`get_sampler_and_scheduler`): a missing `Schedule type` is "Automatic", the sampler's own
schedule in 1.9+, and a schedule at the end of the sampler's name ("DPM++ 2M Karras") wins
over the `Schedule type` field.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from t2i import metadata, samplers
from t2i.choices import HIRES_UPSCALERS
from t2i.errors import UsageError
from t2i.settings import Settings

log = logging.getLogger(__name__)

EXIF_IFD = 0x8769  # the Exif sub-IFD
USER_COMMENT = 0x9286  # where A1111 (piexif) puts its parameters in a JPEG or WebP
MAX_NODES = 10_000  # a ComfyUI graph bigger than this is not summarised
MAX_TEXT = 1_000_000  # characters of one metadata text looked at


@dataclass
class Params:
    """How an image was made, in t2i's words; None: the image does not say."""

    prompt: str = ""
    negative_prompt: str | None = None
    steps: int | None = None
    sampler: str | None = None  # the source's name (A1111's "DPM++ 2M", ComfyUI's "dpmpp_2m", t2i's)
    schedule: str | None = None  # the source's schedule name; None: automatic
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model_name: str = ""
    model_hash: str = ""
    clip_skip: int | None = None  # A1111's count (1 = the last layer)
    # the hires fix as t2i.pipelines.hires.Hires' fields (scale, width, height, steps, denoise, upscaler); None: off
    hires: dict | None = None
    # settings the source recorded that t2i has no way to honour, as "key: value" (an upscaler model, ...)
    unhonoured: list[str] = field(default_factory=list)


@dataclass
class Found:
    source: str  # "t2i" | "a1111" | "comfyui"
    text: str  # what `t2i info` prints
    params: Params
    settings: Settings | None = None  # t2i's exact record, when the image is t2i's


# ------------------------------------------------------------------------------------------- reading


def read(path: str | Path) -> Found | None:
    """What the image at `path` says about how it was made (None: nothing); one-line UsageErrors."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns of a corrupt EXIF block, then reads what it can
            with Image.open(path) as im:
                im.load()
                text = {k: v for k, v in {**(getattr(im, "text", None) or {}), **im.info}.items()
                        if isinstance(v, str)}
                comment = _exif_comment(im, path) if im.format in ("JPEG", "WEBP", "TIFF") else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path} is not a readable image ({e.__class__.__name__})") from None
    parameters, settings = metadata.read(path) if metadata.JSON_KEY in text else (text.get(metadata.A1111_KEY), None)
    parameters = parameters or comment
    if settings is not None:
        return Found("t2i", parameters or json.dumps(settings.to_dict(), indent=2), from_settings(settings), settings)
    if parameters:
        return Found("a1111", parameters, from_a1111(parameters[:MAX_TEXT]))
    if "prompt" in text:
        params, summary = from_comfyui(text["prompt"], path)
        return Found("comfyui", summary, params)
    return None


def _exif_comment(im: Image.Image, path: Path) -> str | None:
    """The EXIF UserComment of a JPEG/WebP as text (A1111 writes it with piexif: b"UNICODE\\0" + UTF-16)."""
    try:
        with warnings.catch_warnings():  # PIL warns of a corrupt block, then reads what it can
            warnings.simplefilter("ignore")
            raw = im.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # noqa: BLE001 - PIL raises many kinds on a damaged EXIF block
        raise UsageError(f"{path} has a malformed EXIF block; its metadata cannot be read") from None
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw.strip("\0") or None
    if not isinstance(raw, (bytes, bytearray)):
        raise UsageError(f"{path} has a malformed EXIF UserComment ({type(raw).__name__}, not bytes)")
    head, body = bytes(raw[:8]), bytes(raw[8:])
    if head == b"UNICODE\0":
        text = _utf16(body)
    elif head in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("latin-1")
    else:  # no code prefix: A1111 falls back to UTF-8 too
        text = bytes(raw).decode("utf-8", errors="replace")
    return text.strip("\0").strip() or None


def _utf16(body: bytes) -> str:
    """UTF-16 of either byte order: piexif writes big-endian, some tools little-endian; a BOM or the zero bytes
    of ASCII characters tell which."""
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", errors="replace")
    even, odd = body[0::2].count(0), body[1::2].count(0)
    return body[: len(body) // 2 * 2].decode("utf-16-be" if even >= odd else "utf-16-le", errors="replace")


def from_settings(s: Settings) -> Params:
    return Params(prompt=s.prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=s.sampler,
                  schedule=s.scheduler, guidance=s.guidance, seed=s.seed, width=s.width, height=s.height,
                  model_name=s.model_name, model_hash=s.model_hash, clip_skip=s.clip_skip,
                  hires=None if not s.hires_upscaler else
                  {"scale": s.hires_scale, "width": s.hires_width, "height": s.hires_height,
                   "steps": s.hires_steps, "denoise": s.hires_denoise, "upscaler": s.hires_upscaler})


# A1111 fields t2i takes (or that change nothing t2i makes); any other one is reported as not honoured.
_A1111_TAKEN = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size",
                "Model", "Model hash", "Lora hashes", "TI hashes", "Version", "Clip skip", "Denoising strength",
                "Hires upscaler"}


def from_a1111(text: str) -> Params:
    """A1111 `parameters` text -> Params, reading it as A1111 does."""
    fields = metadata.parse_a1111(text)
    p = Params(prompt=fields.get("Prompt", ""), negative_prompt=fields.get("Negative prompt", ""),
               sampler=fields.get("Sampler"), schedule=fields.get("Schedule type"),
               model_name=fields.get("Model", ""), model_hash=fields.get("Model hash", ""))
    p.steps = _number(fields, "Steps", int, p)
    p.guidance = _number(fields, "CFG scale", float, p)
    p.seed = _number(fields, "Seed", int, p)
    size = fields.get("Size", "")
    if size:
        w, _, h = size.partition("x")
        if w.isdigit() and h.isdigit():
            p.width, p.height = int(w), int(h)
        else:
            p.unhonoured.append(f"Size: {size} (not WxH)")
    if fields.get("Clip skip"):
        p.clip_skip = _number(fields, "Clip skip", int, p)
    if any(k in fields for k in ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")):
        p.hires = _hires(fields, p)
    elif "Denoising strength" in fields:
        p.unhonoured.append(f"Denoising strength: {fields['Denoising strength']} (an img2img setting; use "
                            "t2i img2img with the init image)")
    p.unhonoured += [f"{k}: {v}" for k, v in fields.items() if k not in _A1111_TAKEN and not k.startswith("Hires")]
    return p


def _hires(fields: dict, p: Params) -> dict:
    """A1111's hires fields as Hires' (t2i.pipelines.hires): A1111's defaults where one is missing (scale 2,
    denoise 0.7, the Latent upscaler); an upscaler model t2i lacks (ESRGAN...) is replaced by Lanczos, noted."""
    hires = {"scale": _number(fields, "Hires upscale", float, p) or 2.0, "width": 0, "height": 0,
             "steps": _number(fields, "Hires steps", int, p) or 0,
             "denoise": _number(fields, "Denoising strength", float, p) or 0.7, "upscaler": "latent"}
    w, _, h = fields.get("Hires resize", "").partition("x")
    if w.isdigit() and h.isdigit():
        hires["width"], hires["height"] = int(w), int(h)
    label = fields.get("Hires upscaler")
    if label:
        by_label = {v.lower(): k for k, v in HIRES_UPSCALERS.items()} | {k: k for k in HIRES_UPSCALERS}
        hires["upscaler"] = by_label.get(label.strip().lower(), "lanczos")
        if label.strip().lower() not in by_label:
            p.unhonoured.append(f"Hires upscaler: {label} (t2i has no upscaler models; Lanczos upscales instead)")
    return hires


def _number(fields: dict, key: str, kind, p: Params):
    value = fields.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        p.unhonoured.append(f"{key}: {value} (not a number)")
        return None


def a1111_sampler(sampler: str | None, schedule: str | None) -> tuple[str, str]:
    """(t2i sampler, schedule key) A1111 1.9+ runs for an infotext's `Sampler` and `Schedule type`: a schedule
    at the end of the sampler's name wins, a missing Schedule type (or one A1111 does not know) is Automatic,
    the sampler's own. UsageError if t2i has no such sampler or cannot run the schedule."""
    found = samplers._split(sampler or "")
    if found is None:
        samplers.get_sampler(sampler or "")  # raises the one-line error
    if found[1] is not None or not schedule:
        return samplers.resolve(sampler, None)
    exact = {*samplers.SCHEDULES, *(s.label for s in samplers.SCHEDULES.values() if s.a1111),
             *samplers.UNSUPPORTED_SCHEDULES, *samplers.UNSUPPORTED_SCHEDULES.values()}
    if schedule not in exact:
        schedule = None  # A1111 reads a Schedule type other than a key or label, exactly, as Automatic
    return samplers.resolve(sampler, schedule)


# ComfyUI's KSampler names -> t2i's (the ones t2i runs; "_gpu" variants draw the same noise on the GPU).
COMFY_SAMPLERS = {"euler": "euler", "euler_ancestral": "euler-a", "heun": "heun", "lms": "lms", "dpm_2": "dpm2",
                  "dpm_2_ancestral": "dpm2-a", "dpmpp_2m": "dpm++2m", "dpmpp_2m_sde": "dpm++2m-sde",
                  "dpmpp_2m_sde_gpu": "dpm++2m-sde", "dpmpp_sde": "dpm++sde", "dpmpp_sde_gpu": "dpm++sde",
                  "ddim": "ddim", "uni_pc": "unipc", "lcm": "lcm"}


def from_comfyui(prompt_json: str, path: Path | str = "image") -> tuple[Params, str]:
    """A ComfyUI `prompt` chunk (its API graph: {id: {"class_type", "inputs"}}) -> (Params, summary text) of
    its first KSampler: sampler, scheduler, seed, steps, CFG, the prompts of its text-encode nodes, the latent
    size and the checkpoint. Any malformed graph gives a one-line UsageError."""
    try:
        graph = json.loads(prompt_json[:MAX_TEXT])
    except (json.JSONDecodeError, RecursionError):
        raise UsageError(f"{path} has a ComfyUI prompt chunk that is not valid JSON") from None
    if not isinstance(graph, dict) or not graph or len(graph) > MAX_NODES:
        raise UsageError(f"{path} has a ComfyUI prompt chunk that is not a graph of nodes")
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict) and isinstance(v.get("inputs"), dict)}
    ksamplers = sorted((k for k, v in nodes.items() if str(v.get("class_type", "")).startswith("KSampler")),
                       key=lambda k: (len(k), k))
    if not ksamplers:
        raise UsageError(f"{path} has a ComfyUI graph with no KSampler node; nothing to summarise")
    ks = nodes[ksamplers[0]]["inputs"]

    def follow(value, want: str, depth: int = 0):
        """A node input's value, through links ([node id, output]) and pass-through nodes, cycles cut."""
        seen = set()
        while isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes and depth < 50:
            node_id = str(value[0])
            if node_id in seen:
                return None
            seen.add(node_id)
            inputs = nodes[node_id]["inputs"]
            for key in (want, "text", "value", "string", "conditioning", "model", "samples", "latent_image"):
                if key in inputs:
                    value = inputs[key]
                    break
            else:
                return None
            depth += 1
        return None if isinstance(value, (list, dict)) else value

    def node_of(value, kinds: tuple[str, ...], depth: int = 0):
        """The first node of one of `kinds` up a chain of links (through LoRA loaders and the like)."""
        seen = set()
        while isinstance(value, list) and len(value) == 2 and str(value[0]) in nodes and len(seen) < 50:
            node_id = str(value[0])
            if node_id in seen:
                return None
            seen.add(node_id)
            node = nodes[node_id]
            if any(str(node.get("class_type", "")).startswith(k) for k in kinds):
                return node["inputs"]
            value = next((node["inputs"][k] for k in ("model", "samples", "latent_image", "conditioning")
                          if k in node["inputs"]), None)
        return None

    p = Params()
    p.prompt = str(follow(ks.get("positive"), "text") or "")
    negative = follow(ks.get("negative"), "text")
    p.negative_prompt = None if negative is None else str(negative)
    p.seed = _as(ks.get("seed", ks.get("noise_seed")), int, follow)
    p.steps = _as(ks.get("steps"), int, follow)
    p.guidance = _as(ks.get("cfg"), float, follow)
    comfy_sampler = follow(ks.get("sampler_name"), "sampler_name")
    comfy_schedule = follow(ks.get("scheduler"), "scheduler")
    if isinstance(comfy_sampler, str):
        p.sampler = COMFY_SAMPLERS.get(comfy_sampler, comfy_sampler)
    if isinstance(comfy_schedule, str):
        p.schedule = comfy_schedule
    latent = node_of(ks.get("latent_image"), ("EmptyLatentImage", "EmptySD3LatentImage"))
    if latent is not None:
        p.width, p.height = _as(latent.get("width"), int, follow), _as(latent.get("height"), int, follow)
    checkpoint = node_of(ks.get("model"), ("CheckpointLoader", "UNETLoader"))
    if checkpoint is not None:
        p.model_name = str(follow(checkpoint.get("ckpt_name", checkpoint.get("unet_name")), "ckpt_name") or "")
        p.model_name = Path(p.model_name.replace("\\", "/")).stem
    denoise = _as(ks.get("denoise"), float, follow)
    if denoise is not None and denoise != 1:
        p.unhonoured.append(f"denoise: {denoise:g} (a partial denoise of another image)")
    if len(ksamplers) > 1:
        p.unhonoured.append(f"{len(ksamplers) - 1} more KSampler node(s) (only node {ksamplers[0]} is taken)")
    more = f", the first of {len(ksamplers)} KSamplers" if len(ksamplers) > 1 else ""
    lines = [f"ComfyUI workflow (KSampler node {ksamplers[0]}{more}):", f"prompt: {p.prompt}",
             f"negative prompt: {p.negative_prompt or ''}",
             ", ".join(f"{k}: {v}" for k, v in [("steps", p.steps), ("sampler", comfy_sampler),
                                                  ("scheduler", comfy_schedule), ("CFG", p.guidance), ("seed", p.seed),
                                                  ("size", f"{p.width}x{p.height}" if p.width else None),
                                                  ("model", p.model_name or None)] if v is not None)]
    return p, "\n".join(lines)


def _as(value, kind, follow):
    value = follow(value, "value")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return kind(value)
    except (ValueError, OverflowError):
        return None


# ------------------------------------------------------------------------------------------- send to txt2img


def request_from_image(path: str | Path, **overrides):
    """A `t2i.jobs.Request` from an image's settings, A1111's "send to txt2img": the prompt (LoRA tags stay in
    it), negative prompt, steps, sampler and schedule, CFG, seed and size; `overrides` (Request fields, None
    ones ignored) win. Returns (request, notes, found): notes has one line for each recorded setting t2i does
    not honour.
    The model is the one asked for (`model=`), not the recorded one: a note says if the names differ."""
    from t2i import jobs  # deferred: torch; `t2i info` must not import it

    found = read(path)
    if found is None:
        raise UsageError(f"{path} carries no generation metadata to make the image from")
    p, notes = found.params, [f"{path}: not honoured: {x}" for x in found.params.unhonoured]
    given = {k: v for k, v in overrides.items() if v is not None}
    fields = {"prompts": [p.prompt], "negative_prompt": p.negative_prompt, "steps": p.steps,
              "guidance": p.guidance, "seed": p.seed if p.seed is not None else -1, "width": p.width,
              "height": p.height}
    if "sampler" not in given and p.sampler:
        try:
            read_names = a1111_sampler if found.source == "a1111" else samplers.resolve
            fields["sampler"], fields["scheduler"] = read_names(p.sampler, p.schedule)
        except UsageError as e:
            where = f"sampler {p.sampler}" + (f", schedule {p.schedule}" if p.schedule else "")
            notes.append(f"{path}: not honoured: {where} ({str(e).split(';')[0]}); the model's default runs")
    if p.clip_skip is not None and p.clip_skip != 1:
        fields["clip_skip"] = p.clip_skip
    if p.hires is not None:
        from t2i.pipelines.hires import Hires  # deferred: torch

        fields["hires"] = Hires(**p.hires)
    if found.source == "t2i" and found.settings is not None:
        s = found.settings
        fields["loras"] = list(s.loras)
        if s.pipeline != "text2image":
            notes.append(f"{path}: it was made by {s.pipeline}; only its text-to-image settings are taken")
    if "sampler" in given and "scheduler" not in given:
        fields.pop("scheduler", None)  # the recorded schedule was the recorded sampler's: the new one's own runs
    fields |= given
    request = jobs.Request(**fields)
    return request, notes, found


def model_note(found: Found, name: str, model_hash: str) -> str | None:
    """A note when the image was made with another model than `name`/`model_hash` (A1111 short hashes match on
    their first 10 hex digits)."""
    p = found.params
    if not (p.model_hash or p.model_name):
        return None
    if p.model_hash and model_hash and model_hash.startswith(p.model_hash[:10].lower()):
        return None
    if not p.model_hash and p.model_name == name:
        return None
    recorded = " ".join(x for x in (p.model_name, f"[{p.model_hash}]" if p.model_hash else "") if x)
    return f"the image was made with the model {recorded}; this run uses {name} [{model_hash[:10]}]"
