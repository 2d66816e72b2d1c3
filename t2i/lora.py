"""LoRA files: parsing `FILE[:SCALE]`, vetting, loading into a pipeline, several at once.

Loading goes through diffusers (`load_lora_weights`, which reads both the
diffusers/peft layout and kohya's/A1111's), with t2i's checks in front: only
safetensors unless pickles are allowed, no NaN/inf weights, and the file must
actually match the model.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from .errors import ModelLoadError, UsageError
from .loading import check_weight_file, lora_hash
from .settings import LoraSpec

_SCALE = re.compile(r"^(.*):([+-]?(?:\d+\.?\d*|\.\d+))$")


def parse_lora_arg(text: str) -> LoraSpec:
    """'style.safetensors:0.8' -> LoraSpec(path, 0.8); the scale defaults to 1."""
    m = _SCALE.match(text)
    path, scale = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not path:
        raise UsageError(f"--lora {text!r}: give FILE or FILE:SCALE")
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

    def spec(self, lora: LoraSpec | str) -> LoraSpec:
        """Resolve and vet a LoRA argument (cheap: no tensors are loaded)."""
        if isinstance(lora, str):
            lora = parse_lora_arg(lora)
        path = Path(lora.path).expanduser()
        if not path.is_file():
            raise UsageError(f"LoRA file {path} does not exist")
        check_weight_file(path, self.allow_pickle)
        return replace(lora, path=str(path), name=lora.name or path.stem, hash=lora.hash or lora_hash(path))

    def resolve_name(self, name: str) -> Path:
        """`<lora:NAME:...>` -> NAME.safetensors in the LoRA folder."""
        if self.lora_dir is None:
            raise UsageError(f"the prompt uses <lora:{name}:...> but no LoRA folder is set; pass --lora-dir DIR")
        for suffix in (".safetensors", *((".pt", ".ckpt", ".bin") if self.allow_pickle else ())):
            p = self.lora_dir / f"{name}{suffix}"
            if p.is_file():
                return p
        raise UsageError(f"<lora:{name}:...>: no {name}.safetensors in {self.lora_dir}")

    def activate(self, specs: list[LoraSpec], tagged: list[tuple[str, float]] = ()) -> list[LoraSpec]:
        """Make exactly these LoRAs active at these scales (loading new ones, dropping others)."""
        specs = list(specs) + [self.spec(LoraSpec(str(self.resolve_name(n)), s, name=n)) for n, s in tagged]
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
        from .lora_format import load_lora_state_dict

        state_dict = load_lora_state_dict(spec.path)
        try:
            self.pipe.load_lora_weights(state_dict, adapter_name=adapter)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"LoRA {spec.path} does not fit this model: {str(e).splitlines()[0]}") from None
        self._loaded[adapter] = spec.hash


def _adapter_name(spec: LoraSpec) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', spec.name)}_{spec.hash[:8]}"
