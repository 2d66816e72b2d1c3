"""LoRA files: parsing `FILE[:SCALE]`, vetting, loading into a pipeline, several at once.

Either layout (diffusers/peft or kohya's/A1111's, see `lora_format`) is turned
into diffusers' with alpha/rank folded into lora_B, then loaded with diffusers'
`load_lora_weights`. t2i's checks come first: only safetensors unless pickles are
allowed, no NaN/inf weights, and every module of the file must match a module of
the model by name and shape (a LoRA for another model is an error, not a no-op).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from t2i.errors import ModelLoadError, UsageError, did_you_mean
from t2i.files import WEIGHT_SUFFIXES, check_weight_file, file_sha256
from t2i.lora.format import read_lora, to_diffusers
from t2i.settings import LoraSpec

_SCALE = re.compile(r"^(.*):([+-]?(?:\d+\.?\d*|\.\d+))$")


def parse_lora_arg(text: str) -> LoraSpec:
    """'style.safetensors:0.8' -> LoraSpec(path, 0.8); the scale defaults to 1."""
    m = _SCALE.match(text)
    path, scale = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not path:
        raise UsageError(f"--lora {text!r}: give FILE or FILE:SCALE")
    head, sep, tail = text.rpartition(":")
    if not m and sep and head and not Path(text).expanduser().exists() and (
            Path(head).expanduser().is_file() or Path(head).suffix.lower() in WEIGHT_SUFFIXES):
        what = f"the scale {tail!r} is not a number" if tail else "no scale after the ':'"
        raise UsageError(f"--lora {text!r}: {what}; use {head}:0.8, or {head} alone for scale 1")
    return LoraSpec(path=path, scale=scale)


class LoraSet:
    """The LoRAs loaded into one diffusers pipeline, and which are active at what scale."""

    def __init__(self, pipe, lora_dir: str | Path | None = None, allow_pickle: bool = False):
        self.pipe = pipe
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.allow_pickle = allow_pickle
        self._loaded: dict[str, str] = {}  # adapter name -> file hash it was loaded from

    def rebind(self, pipe) -> "LoraSet":
        """The same adapters seen through another pipeline object sharing the components."""
        other = LoraSet(pipe, self.lora_dir, self.allow_pickle)
        other._loaded = self._loaded  # shared: the adapters live in the shared modules
        return other

    def spec(self, lora: LoraSpec | str | Path) -> LoraSpec:
        """Resolve and vet a LoRA argument: "FILE[:SCALE]", a path (scale 1) or a LoraSpec. No tensors are loaded."""
        if isinstance(lora, str):
            lora = parse_lora_arg(lora)
        elif isinstance(lora, os.PathLike):
            lora = LoraSpec(os.fspath(lora))
        elif not isinstance(lora, LoraSpec):
            raise UsageError(f"a LoRA is a path, \"FILE:SCALE\" or a LoraSpec, got {type(lora).__name__}")
        path = Path(lora.path).expanduser()
        if not path.is_file():
            raise UsageError(f"LoRA file {path} does not exist")
        check_weight_file(path, self.allow_pickle)
        return replace(lora, path=str(path), name=lora.name or path.stem, hash=lora.hash or lora_hash(path))

    def resolve_name(self, name: str) -> Path:
        """`<lora:NAME:...>` -> NAME.safetensors in the LoRA folder."""
        if self.lora_dir is None:
            raise UsageError(f"the prompt uses <lora:{name}:...> but no LoRA folder is set; pass --lora-dir DIR")
        suffixes = (".safetensors", *((".pt", ".ckpt", ".bin") if self.allow_pickle else ()))
        for suffix in suffixes:
            p = self.lora_dir / f"{name}{suffix}"
            if p.is_file():
                return p
        there = self.lora_dir.iterdir() if self.lora_dir.is_dir() else ()
        hint = did_you_mean(name, [p.stem for p in there if p.suffix.lower() in suffixes])
        raise UsageError(f"<lora:{name}:...>: no {name}.safetensors in {self.lora_dir}{f'; {hint}' if hint else ''}")

    def tagged(self, tags: list[tuple[str, float]]) -> list[LoraSpec]:
        """A prompt's `<lora:NAME:SCALE>` tags (see prompts.extract_loras) as vetted specs; no tensors loaded."""
        return [self.spec(LoraSpec(str(self.resolve_name(n)), s, name=n)) for n, s in tags]

    def activate(self, specs: list[LoraSpec], tagged: list[tuple[str, float]] = ()) -> list[LoraSpec]:
        """Make exactly these LoRAs active at these scales (loading new ones, dropping others)."""
        specs = list(specs) + self.tagged(tagged)
        wanted: dict[str, LoraSpec] = {}
        for s in specs:
            wanted[_adapter_name(s)] = s
        stale = [a for a in self._loaded if a not in wanted]
        if stale:
            self.pipe.delete_adapters(stale)
            for a in stale:
                del self._loaded[a]
        for adapter, s in wanted.items():
            if adapter not in self._loaded:
                self._load(adapter, s)
        if wanted:
            self.pipe.set_adapters(list(wanted), [s.scale for s in wanted.values()])
        return specs

    def _load(self, adapter: str, spec: LoraSpec) -> None:
        """Load one file (either layout) as `adapter`, only if every module of it fits this model."""
        state_dict, metadata = read_lora(spec.path, self.allow_pickle)
        components = lora_components(self.pipe)
        names = [f"{c}.{n}" for c, m in components.items() for n, _ in m.named_modules()]
        lpb = components["unet"].config.layers_per_block if "unet" in components else 2  # for sgm-named files
        state_dict = to_diffusers(state_dict, metadata, names=names,
                                  layers_per_block=lpb if isinstance(lpb, int) else lpb[0])
        check_fits(state_dict, components, Path(spec.path).name)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several: intended
                self.pipe.load_lora_weights(state_dict, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError) as e:
            self._forget(adapter)
            raise ModelLoadError(f"LoRA {spec.path} does not fit this model: {str(e).splitlines()[0]}") from None
        self._loaded[adapter] = spec.hash

    def _forget(self, adapter: str) -> None:
        """Remove what a failed load may have left behind in some components."""
        try:
            self.pipe.delete_adapters([adapter])
        except (ValueError, KeyError, AttributeError):
            pass


def lora_components(pipe) -> dict:
    """The modules of a diffusers pipeline that LoRAs patch: 'unet', 'text_encoder', 'text_encoder_2'."""
    names = getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder", "text_encoder_2"))
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def match_lora(state_dict: dict, components: dict) -> tuple[int, int, list[str]]:
    """How many LoRA modules (diffusers layout) find a module of the same name and shape.

    Returns (matched, total, why each unmatched one failed).
    """
    modules = sorted(k[: -len(".lora_A.weight")] for k in state_dict if k.endswith(".lora_A.weight"))
    misses = []
    for name in modules:
        a, b = state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"]
        component, _, path = name.partition(".")
        try:
            target = components[component].get_submodule(path)
        except (KeyError, AttributeError):
            misses.append(f"{name}: no such module")
            continue
        target = getattr(target, "base_layer", target)  # already wrapped by another adapter
        if a.shape[0] != b.shape[1]:
            misses.append(f"{name}: lora_A has rank {a.shape[0]}, lora_B {b.shape[1]}")
            continue
        if isinstance(target, torch.nn.Linear):
            want = ((a.shape[0], target.in_features), (target.out_features, b.shape[1]))
            got = (tuple(a.shape), tuple(b.shape))
        elif isinstance(target, torch.nn.Conv2d):
            want = ((a.shape[0], target.in_channels, *target.kernel_size), (target.out_channels, b.shape[1]))
            got = (tuple(a.shape), tuple(b.shape[:2]))
        else:
            misses.append(f"{name}: a {type(target).__name__}, not a Linear or Conv2d")
            continue
        if want != got:
            misses.append(f"{name}: the model's is {want[1][0]}x{want[0][1]}, the LoRA's {got[1][0]}x{got[0][1]}")
    return len(modules) - len(misses), len(modules), misses


def check_fits(state_dict: dict, components: dict, label: str) -> None:
    """ModelLoadError unless every module of the LoRA fits the model: never a silent no-op."""
    matched, total, misses = match_lora(state_dict, components)
    if not misses:
        return
    model_xl = "text_encoder_2" in components
    lora_xl = _looks_sdxl(state_dict)
    if lora_xl and not model_xl:
        hint = "an SDXL LoRA on an SD 1.x/2.x model?"
    elif model_xl and lora_xl is False:
        hint = "an SD 1.x/2.x LoRA on an SDXL model?"
    else:
        hint = f"e.g. {misses[0]}"
    raise ModelLoadError(f"LoRA {label} matched {matched} of {total} modules of this model ({hint}); refused")


def _looks_sdxl(state_dict: dict) -> bool | None:
    """A guess from the names: SDXL has a second text encoder and no attention in the first UNet block."""
    keys = list(state_dict)
    if any(k.startswith("text_encoder_2.") for k in keys):
        return True
    if any(k.startswith("unet.down_blocks.0.attentions.") for k in keys):
        return False
    if any(re.match(r"unet\.down_blocks\.\d+\.attentions\.", k) for k in keys):
        return True
    return None


def _adapter_name(spec: LoraSpec) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', spec.name)}_{spec.hash[:8]}"


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash ("Lora hashes"): sha256 of the safetensors tensor data, first 12 hex."""
    path = Path(path)
    return file_sha256(path, skip_safetensors_header=path.suffix.lower() == ".safetensors")[:12]
