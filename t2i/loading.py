"""Finding, vetting and loading models.

`resolve(model)` turns what the user typed into a `ModelSource` without
loading anything (cheap, so the CLI can fail fast); `load(source, ...)` builds
the diffusers pipeline. Weights load from safetensors only unless the caller
passes `allow_pickle=True`; no remote or custom code is ever run.

A model can be:
- None: the bundled demo model `t2i-shapes` (assets/),
- a local diffusers folder (model_index.json inside),
- a single-file checkpoint (.safetensors; .ckpt only with allow_pickle),
- a Hugging Face hub id such as `stable-diffusion-v1-5/stable-diffusion-v1-5`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ModelLoadError, UnsafeFileError, UsageError

BUNDLED_NAME = "t2i-shapes"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_ALLOWED_LIBRARIES = {"diffusers", "transformers", None}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class ModelSource:
    kind: str  # bundled | folder | single_file | hub
    location: str  # path or hub id
    name: str  # what A1111 shows as "Model"
    asked: str = ""  # what the user typed ("" for the bundled model)


# --------------------------------------------------------------------------- file vetting


def is_pickle_file(path: str | Path) -> bool:
    """True for torch/pickle files, whatever they are named: a zip archive or a pickle stream."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (holds a pickle)
        return True
    # Pickle protocols 2-5 open with PROTO; older ones fail the safetensors header check instead.
    return len(head) >= 2 and head[0] == 0x80 and head[1] in range(2, 6)


def check_safetensors(path: str | Path) -> dict:
    """Validate a safetensors file's header without loading tensors; return the header.

    Refuses pickles with a .safetensors name, Git LFS pointers, HTML pages,
    truncated files and headers that claim more data than the file has.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        lead = f.read(64)  # enough to recognise a Git LFS pointer, which 8 bytes are not
        head = lead[:8]
        f.seek(8)
        if len(head) < 8:
            raise ModelLoadError(f"{path} is not a safetensors file (only {size} bytes)")
        if lead.startswith(b"version https://git-lfs"):
            raise ModelLoadError(f"{path} is a Git LFS pointer, not the weights; run `git lfs pull` or download the real file")
        if is_pickle_file(path):
            raise UnsafeFileError(f"{path} is a pickle file named .safetensors; refused (pickles can run code)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or n + 8 > size:
            raise ModelLoadError(f"{path} is not a valid safetensors file (truncated or bad header); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{path} is not a valid safetensors file (unreadable header); download it again") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path} is not a valid safetensors file (bad header)")
    end = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            lo, hi = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ModelLoadError(f"{path} is not a valid safetensors file (bad entry {key!r})") from None
        if not (0 <= lo <= hi) or end + hi > size:
            raise ModelLoadError(f"{path} is truncated (tensor {key!r} runs past the end of the file); download it again")
    return header


def check_weight_file(path: str | Path, allow_pickle: bool = False) -> None:
    """Refuse what could run code, and broken files, before any loader sees them."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        check_safetensors(path)
        return
    if path.suffix.lower() in PICKLE_SUFFIXES or is_pickle_file(path):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path} is a pickle-based file ({path.suffix or 'no suffix'}), which can run code when loaded; "
                "use a .safetensors file, or pass --allow-pickle if you trust its source"
            )
        return
    raise ModelLoadError(f"{path} is not a weights file t2i knows (.safetensors, or .ckpt/.bin/.pt with --allow-pickle)")


def check_folder(path: Path, allow_pickle: bool = False) -> None:
    """Vet a diffusers folder: its model_index, every weights file, and no custom code."""
    index = path / "model_index.json"
    try:
        config = json.loads(index.read_text())
    except json.JSONDecodeError:
        raise ModelLoadError(f"{index} is not valid JSON; the model folder is damaged") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ModelLoadError(f"{index} has no _class_name; not a diffusers model folder")
    for name, value in config.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library = value[0]
        if library not in _ALLOWED_LIBRARIES:
            raise UnsafeFileError(f"{index}: component {name!r} comes from {library!r}; custom code is never run")
        if library and not (path / name).is_dir():
            raise ModelLoadError(f"model folder {path} has no {name}/ folder that model_index.json lists")
        if library and name not in ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor", "safety_checker"):
            _check_component(path / name, allow_pickle)
    for py in path.rglob("*.py"):
        raise UnsafeFileError(f"model folder {path} contains code ({py.relative_to(path)}); t2i never runs model code")


def _check_component(folder: Path, allow_pickle: bool) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder} has no config.json; the model folder is incomplete")
    try:
        values = json.loads(config.read_text())
    except json.JSONDecodeError:
        raise ModelLoadError(f"{config} is not valid JSON; the model folder is damaged") from None
    if not isinstance(values, dict):
        raise ModelLoadError(f"{config} holds a JSON {type(values).__name__}, not an object; "
                             "the model folder is damaged")
    weights = [p for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES]
    safe = [p for p in weights if p.suffix.lower() == ".safetensors"]
    if not weights:
        raise ModelLoadError(f"{folder} has no weights file")
    if not safe and not allow_pickle:
        raise UnsafeFileError(
            f"{folder} has only pickle-based weights ({weights[0].name}); convert to safetensors, "
            "or pass --allow-pickle if you trust its source"
        )
    for p in safe:
        check_safetensors(p)
    return values


# --------------------------------------------------------------------------- resolving


def bundled_model_path() -> Path | None:
    """Where the bundled demo model lives in this install, or None if it is not there."""
    try:
        root = resources.files("t2i.assets") / BUNDLED_NAME
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if (path / "model_index.json").is_file() else None


def _is_hub_id(text: str) -> bool:
    """`org/name` that is not a path someone meant (./x, /x, ~/x, a weights file name)."""
    path = Path(text).expanduser()
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").split("/", 1)[-1] \
        or path.suffix.lower() in WEIGHT_SUFFIXES or text.count("/") != 1
    return not looks_like_path and bool(_HUB_ID.match(text))


def resolve(model: str | None) -> ModelSource:
    """Decide what `model` names, checking that local paths exist; loads nothing."""
    if model is None or model == "":
        path = bundled_model_path()
        if path is None:
            raise ModelLoadError(
                f"the bundled demo model {BUNDLED_NAME} is not in this install; pass --model PATH_OR_HUB_ID"
            )
        return ModelSource("bundled", str(path), BUNDLED_NAME, "")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{path} is a folder without model_index.json; give a diffusers model folder or a checkpoint file")
        return ModelSource("folder", str(path), path.resolve().name, model)
    if path.is_file():
        return ModelSource("single_file", str(path), path.stem, model)
    if not _is_hub_id(model):
        raise UsageError(f"model {model} does not exist; give a diffusers folder, a .safetensors file or a hub id (org/name)")
    return ModelSource("hub", model, model.split("/")[-1], model)


# --------------------------------------------------------------------------- architecture


def arch_of_folder(path: Path) -> str:
    """'sdxl', 'sd2' or 'sd1' for a diffusers folder."""
    index = json.loads((path / "model_index.json").read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "sd1"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def arch_of_keys(keys) -> str:
    """'sdxl', 'sd2' or 'sd1' from an original (LDM) single-file checkpoint's tensor names."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith(("cond_stage_model.transformer.", "model.diffusion_model.")) for k in keys):
        return "sd1"
    raise ModelLoadError("checkpoint is not a Stable Diffusion 1.x/2.x/SDXL model (unknown tensor names)")


# --------------------------------------------------------------------------- hashes


def _cache_file() -> Path:
    return Path(os.environ.get("T2I_CACHE", Path.home() / ".cache" / "t2i")) / "hashes.json"


def file_sha256(path: str | Path, skip_safetensors_header: bool = False) -> str:
    """sha256 of a file (cached by path, size and mtime); optionally of its tensor data only."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{int(skip_safetensors_header)}"
    cache = _cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    known[key] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def model_hash(source: ModelSource, folder: Path | None = None) -> str:
    """A1111's "Model hash" (sha256, first 10 hex) for a file; for a folder, over its weights."""
    if source.kind == "single_file":
        return file_sha256(source.location)[:10]
    folder = folder or Path(source.location)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:10]


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash ("Lora hashes"): sha256 of the safetensors tensor data, first 12 hex."""
    path = Path(path)
    return file_sha256(path, skip_safetensors_header=path.suffix.lower() == ".safetensors")[:12]


# --------------------------------------------------------------------------- loading


def _pipeline_class(arch: str):
    import diffusers  # one pipeline module only: each costs import time

    return diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' loading bars and its `torch_dtype` rename notice say nothing a user can act on."""
    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()
    level = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)  # its logged errors repeat what the raised error says
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            yield
    finally:
        dlogging.set_verbosity(level)


def _common_kwargs(arch: str, dtype) -> dict:
    kwargs = {"torch_dtype": dtype}
    if arch != "sdxl":
        kwargs |= {"safety_checker": None, "requires_safety_checker": False, "feature_extractor": None}
    return kwargs


def load(source: ModelSource, dtype, allow_pickle: bool = False, model_config: str | None = None):
    """Build the diffusers pipeline for `source`; return (pipeline, arch, local folder or file)."""
    if source.kind in ("bundled", "folder"):
        path = Path(source.location)
        check_folder(path, allow_pickle)
        arch = arch_of_folder(path)
        cls = _pipeline_class(arch)
        try:
            with _quiet_loading():
                pipe = cls.from_pretrained(
                    str(path), use_safetensors=None if allow_pickle else True, local_files_only=True,
                    **_common_kwargs(arch, dtype),
                )
        except (pickle.UnpicklingError, OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            # diffusers and transformers read .bin weights with weights_only=True; a payload is refused there
            if any(isinstance(x, pickle.UnpicklingError) for x in _chain(e)):
                raise ModelLoadError(f"could not load the model folder {path}: a pickle-based weights file in it "
                                     "holds objects other than tensors (read with weights_only=True, so no code ran); "
                                     "use safetensors weights") from None
            raise ModelLoadError(f"could not load the model folder {path}: {_first_line(e)}") from None
        return pipe, arch, path
    if source.kind == "single_file":
        return _load_single_file(Path(source.location), dtype, allow_pickle, model_config)
    return _load_hub(source.location, dtype, allow_pickle)


TINY_VAE_FOLDER = "vae_tiny"  # a model folder's own small decoder (the bundled model ships one)


def tiny_vae_folder(value: str, model_path: Path | None) -> Path:
    """Where the small VAE decoder of `--speed tiny_vae[=VALUE]` (a diffusers AutoencoderTiny, TAESD-style) lives:
    VALUE a local folder or a hub id; no VALUE: the model folder's own vae_tiny/."""
    if not value:
        own = model_path / TINY_VAE_FOLDER if model_path is not None and model_path.is_dir() else None
        if own is None or not (own / "config.json").is_file():
            raise UsageError(f"this model has no {TINY_VAE_FOLDER}/ folder; give a tiny VAE with --speed "
                             "tiny_vae=PATH (an AutoencoderTiny folder, e.g. a local copy of madebyollin/taesd)")
        return own
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _is_hub_id(value):
        raise UsageError(f"tiny_vae {value}: not a folder; give an AutoencoderTiny folder (config.json and "
                         ".safetensors weights) or a hub id such as madebyollin/taesd")
    return hub_snapshot(value)


def _from_vetted_folder(model_class, folder: Path, dtype, what: str):
    """`model_class.from_pretrained` on a folder already vetted (safetensors only, local); errors in one line."""
    try:
        with _quiet_loading():
            return model_class.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True,
                                               local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"could not load {what} {folder}: {_first_line(e)}") from None


def load_tiny_vae(folder: Path, dtype, device, latent_channels: int):
    """An AutoencoderTiny from a vetted folder (safetensors only, no code), checked against the UNet's latents."""
    from diffusers import AutoencoderTiny

    kind = _check_component(folder, allow_pickle=False).get("_class_name")
    if kind != "AutoencoderTiny":
        raise ModelLoadError(f"{folder} is not an AutoencoderTiny (its config says {kind or 'no _class_name'}); "
                             "give a tiny VAE folder (TAESD-style)")
    vae = _from_vetted_folder(AutoencoderTiny, folder, dtype, "the tiny VAE")
    if vae.config.latent_channels != latent_channels:
        raise UsageError(f"the tiny VAE {folder} decodes {vae.config.latent_channels}-channel latents, this model "
                         f"makes {latent_channels}; give the tiny VAE made for this model family")
    return vae.to(device).eval().requires_grad_(False)


GUIDE_FOLDER = "guide"  # a model folder's weaker UNet for autoguidance (the bundled model ships one)


def load_guide(model_path: Path | None, dtype, device, unet_config):
    """The model folder's guide/ UNet (autoguidance, see pipelines.base.autoguided_unet), or None without one.

    Vetted like every component (safetensors only, no code) and checked against the model's UNet: it must
    read the same latents and the same text embeddings. Its weights are a UNet's own, or a difference from the
    model's unet/ (t2i.guide's delta.safetensors, made by `t2i guide`).
    """
    folder = model_path / GUIDE_FOLDER if model_path is not None and model_path.is_dir() else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    from diffusers import UNet2DConditionModel

    config = _check_component(folder, allow_pickle=False)
    kind = config.get("_class_name")
    if kind != "UNet2DConditionModel":
        raise ModelLoadError(f"{folder} is not a UNet2DConditionModel (its config says {kind or 'no _class_name'}); "
                             f"a model's {GUIDE_FOLDER}/ holds the UNet that autoguidance steers away from")
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if config.get(key) != unet_config.get(key):
            raise ModelLoadError(f"{folder}: {key} is {config.get(key)}, the model's UNet has "
                                 f"{unet_config.get(key)}; the guide must read the same latents and prompts")
    from . import guide as guides

    if (folder / guides.DELTA_FILE).is_file():  # a difference from the model's UNet (t2i.guide)
        weights = guides.read(folder, model_path / "unet" / guides.UNET_FILE)
        with _quiet_loading():
            guide = UNet2DConditionModel.from_config(config)
        try:
            guide.load_state_dict(weights)
        except RuntimeError as e:
            raise ModelLoadError(f"{folder}/config.json does not describe the UNet its difference rebuilds "
                                 f"({_first_line(e)}); remake it with `t2i guide`") from None
        guide.to(dtype)
    else:
        guide = _from_vetted_folder(UNet2DConditionModel, folder, dtype, "the guide UNet")
    return guide.to(device).eval().requires_grad_(False)


def load_pickled_weights(path: Path) -> dict:
    """A pickle-based weights file (only when pickles are allowed), read with torch.load(weights_only=True):
    tensors and plain containers only, never code. Anything else is a one-line ModelLoadError."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error below says what matters
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is one message
        what = "objects other than tensors" if "weights only" in str(e).lower() else _first_line(e)
        raise ModelLoadError(f"could not read {path}: it holds {what} (read with weights_only=True, "
                             "so no code ran); use a .safetensors file") from None
    if not isinstance(sd, dict):
        raise ModelLoadError(f"could not read {path}: it holds a {type(sd).__name__}, not a dict of tensors")
    return sd


def _load_single_file(path: Path, dtype, allow_pickle: bool, model_config: str | None):
    check_weight_file(path, allow_pickle)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            arch = arch_of_keys(f.keys())
    else:
        sd = load_pickled_weights(path)
        arch = arch_of_keys(sd.get("state_dict", sd).keys())
    cls = _pipeline_class(arch)
    kwargs = _common_kwargs(arch, dtype)
    if model_config:
        kwargs |= {"config": str(_check_model_config(model_config, arch, path)), "local_files_only": True}
    try:
        with _quiet_loading():
            pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds here; all mean "could not build it"
        msg = _first_line(e)
        if _is_offline_error(e) or "local_files_only" in msg or "offline" in msg.lower():
            raise ModelLoadError(
                f"{path.name}: building a {arch} pipeline from a single file needs its diffusers config, which could "
                "not be fetched (offline?); pass --model-config DIR (a diffusers folder of the same architecture)"
            ) from None
        raise ModelLoadError(f"could not load {path}: {msg}") from None
    return pipe, arch, path


def _check_model_config(model_config: str, arch: str, path: Path) -> Path:
    """The --model-config folder, if it is a local diffusers folder of the checkpoint's architecture.

    Anything else would reach diffusers as a hub id (which it fetches even with local_files_only)
    or fail deep inside it with a bare tensor name.
    """
    folder = Path(model_config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"--model-config {model_config} is not a diffusers folder (no model_index.json); "
                         f"give a local folder of a {arch} model")
    try:
        found = arch_of_folder(folder)
    except json.JSONDecodeError:
        raise UsageError(f"--model-config {model_config}: model_index.json is not valid JSON") from None
    if found != arch:
        raise UsageError(f"--model-config {model_config} is a {found} model but {path.name} is {arch}; "
                         f"give a folder of a {arch} model")
    return folder


def _load_hub(repo_id: str, dtype, allow_pickle: bool):
    folder = hub_snapshot(repo_id, allow_pickle)
    source = ModelSource("folder", str(folder), repo_id.split("/")[-1], repo_id)
    return load(source, dtype, allow_pickle)


def hub_snapshot(repo_id: str, allow_pickle: bool = False) -> Path:
    """A local copy of a hub repository's configs and weights (safetensors only, unless pickle is allowed)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors", *(["*.bin"] if allow_pickle else [])],
                ignore_patterns=["*.fp16.*", "*.non_ema.*", "*.ema.*", "*.ckpt", "*.onnx", "*.msgpack", "*.h5"],
            )
        )
    except Exception as e:  # noqa: BLE001
        if _is_offline_error(e):
            raise ModelLoadError(
                f"could not reach the Hugging Face hub to fetch {repo_id} (offline?); download it where you are "
                "online, or pass a local folder with --model"
            ) from None
        raise ModelLoadError(f"could not fetch {repo_id} from the hub: {_first_line(e)}") from None


def _is_offline_error(e: BaseException) -> bool:
    names = {type(x).__name__ for x in _chain(e)}
    hints = {"ConnectionError", "ConnectTimeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
             "NameResolutionError", "MaxRetryError", "ConnectError", "TimeoutException", "gaierror"}
    return bool(names & hints) or "offline" in str(e).lower() or "connect" in str(e).lower()


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__
