"""How t2i wraps a UNet's forward for the length of a block: the one mechanism every speed option uses."""

from __future__ import annotations

import contextlib

import torch


_SUBCLASSES: dict = {}  # (class, key) -> the wrapped subclass, reused so torch.compile's guards keep matching


@contextlib.contextmanager
def wrapped_forward(module: torch.nn.Module, wrap, key=None):
    """Replace `module`'s forward by `wrap(forward)` for the block.

    The wrapper goes on a subclass, not on the instance: t2i's per-image UNet
    evaluation (pipelines.unet_calls.per_image_unet) sets and deletes an instance `forward`
    of its own for each call, which would drop an instance-level wrapper. With a `key`
    the subclass is made once and reused (a compiled forward then compiles once).
    """
    cls = type(module)
    sub = _SUBCLASSES.get((cls, key)) if key is not None else None
    if sub is None:
        sub = type(cls.__name__, (cls,), {"forward": wrap(cls.forward), "__module__": cls.__module__})
        if key is not None:
            _SUBCLASSES[(cls, key)] = sub
    module.__class__ = sub
    try:
        yield
    finally:
        module.__class__ = cls


def _output_as(out, dtype: torch.dtype):
    """A UNet's output (tuple or UNet2DConditionOutput) with its sample cast to `dtype`."""
    if isinstance(out, tuple):
        return (out[0].to(dtype), *out[1:])
    out.sample = out.sample.to(dtype)
    return out


@contextlib.contextmanager
def exact_batch(pipe, exact: bool):
    before, pipe.exact_batch = pipe.exact_batch, exact
    try:
        yield
    finally:
        pipe.exact_batch = before
