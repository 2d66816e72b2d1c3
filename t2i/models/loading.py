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
import json
import pickle
import warnings
from pathlib import Path

import diffusers
from diffusers.utils import logging as dlogging
from huggingface_hub import snapshot_download
from safetensors import safe_open

from t2i.errors import ModelLoadError, UnsafeFileError, UsageError, causes, first_line
from t2i.files import WEIGHT_SUFFIXES, check_safetensors, check_weight_file, load_pickled_weights
from t2i.models.sources import ModelSource, arch_of_folder, arch_of_keys

_ALLOWED_LIBRARIES = {"diffusers", "transformers", None}


# --------------------------------------------------------------------------- file vetting


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
            check_component(path / name, allow_pickle)
    for py in path.rglob("*.py"):
        raise UnsafeFileError(f"model folder {path} contains code ({py.relative_to(path)}); t2i never runs model code")


def check_component(folder: Path, allow_pickle: bool) -> dict:
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


# --------------------------------------------------------------------------- architecture


# --------------------------------------------------------------------------- hashes


# --------------------------------------------------------------------------- loading


def _pipeline_class(arch: str):
    # diffusers imports a pipeline's module when first named: one of the two, each costs import time
    return diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline


@contextlib.contextmanager
def quiet_loading():
    """diffusers' loading bars and its `torch_dtype` rename notice say nothing a user can act on."""
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
            with quiet_loading():
                pipe = cls.from_pretrained(
                    str(path), use_safetensors=None if allow_pickle else True, local_files_only=True,
                    **_common_kwargs(arch, dtype),
                )
        except (pickle.UnpicklingError, OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            # diffusers and transformers read .bin weights with weights_only=True; a payload is refused there
            if any(isinstance(x, pickle.UnpicklingError) for x in causes(e)):
                raise ModelLoadError(f"could not load the model folder {path}: a pickle-based weights file in it "
                                     "holds objects other than tensors (read with weights_only=True, so no code ran); "
                                     "use safetensors weights") from None
            raise ModelLoadError(f"could not load the model folder {path}: {first_line(e)}") from None
        return pipe, arch, path
    if source.kind == "single_file":
        return _load_single_file(Path(source.location), dtype, allow_pickle, model_config)
    return _load_hub(source.location, dtype, allow_pickle)


def from_vetted_folder(model_class, folder: Path, dtype, what: str):
    """`model_class.from_pretrained` on a folder already vetted (safetensors only, local); errors in one line."""
    try:
        with quiet_loading():
            return model_class.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True,
                                               local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"could not load {what} {folder}: {first_line(e)}") from None


def _load_single_file(path: Path, dtype, allow_pickle: bool, model_config: str | None):
    check_weight_file(path, allow_pickle)
    if path.suffix.lower() == ".safetensors":
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
        with quiet_loading():
            pipe = cls.from_single_file(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds here; all mean "could not build it"
        msg = first_line(e)
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
        raise ModelLoadError(f"could not fetch {repo_id} from the hub: {first_line(e)}") from None


def _is_offline_error(e: BaseException) -> bool:
    names = {type(x).__name__ for x in causes(e)}
    hints = {"ConnectionError", "ConnectTimeout", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
             "NameResolutionError", "MaxRetryError", "ConnectError", "TimeoutException", "gaierror"}
    return bool(names & hints) or "offline" in str(e).lower() or "connect" in str(e).lower()


