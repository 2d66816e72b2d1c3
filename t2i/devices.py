"""Device and dtype choice, in one place.

`auto` means: CUDA if present, else Apple's MPS, else the CPU; half precision
on a GPU (bf16 where the card supports it well, else fp16) and fp32 on the
CPU, where it is the safe and (without AMX/avx512-bf16) the fast choice.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

from t2i.choices import DEVICES, DTYPES
from t2i.errors import UsageError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # DTYPES but "auto"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, checking it exists."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise UsageError(f"unknown device {name!r}; use one of: {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible to torch; use --device cpu or auto")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' | 'fp32' | 'fp16' | 'bf16' -> torch.dtype for `device`."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    device = device or torch.device("cpu")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() and _is_ampere_or_newer() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in TORCH_DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of: {', '.join(DTYPES)}")
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 is not supported on the CPU (slow and overflow-prone); use fp32 or bf16")
    return TORCH_DTYPES[name]


def _is_ampere_or_newer() -> bool:
    return torch.cuda.get_device_capability()[0] >= 8


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------- capabilities
# What `--speed auto` decides from (t2i.speed.options.auto_choice): one function per capability, so tests pin them.


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo).

    Without either, torch emulates bf16 matmuls and convolutions, slower than fp32; with them oneDNN runs bf16
    several times faster than fp32 (AMX: ~7x on a 2048x2048 matmul). The environment variable T2I_CPU_BF16=0
    or 1 overrides what the CPU says (the test suite sets 0, so that what `auto` picks does not depend on the
    CPU the tests run on).
    """
    forced = os.environ.get("T2I_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _cpuinfo_has_bf16()


@lru_cache(maxsize=1)
def _cpuinfo_has_bf16() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)
