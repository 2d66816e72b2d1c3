"""Reading LoRA files into state dicts, with checks (issue: strict formats come here)."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError


def load_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file; NaN/inf weights are refused."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:  # only reached when pickles were explicitly allowed
        sd = torch.load(path, map_location="cpu", weights_only=True)
    bad = [k for k, v in sd.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelLoadError(f"LoRA {path} contains NaN/inf weights ({len(bad)} tensors, e.g. {bad[0]}); refused")
    return sd
