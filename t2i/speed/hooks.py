"""How t2i wraps a module's forward for the length of a block: the one mechanism every UNet-call wrapper uses.

    def in_bf16(forward):  # gets the next forward inward, returns its replacement
        def forward_bf16(sample, *args, **kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(sample, *args, **kwargs)
        return forward_bf16

    with hooked(unet, "bf16", in_bf16):
        pipe(...)  # every unet(...) call goes through forward_bf16
    # here unet is exactly as it was

A wrapper sees the call's arguments and output and may change them, and may call the inner
forward once, several times (per-image exact batches), on other rows (autoguidance), or not at
all (the feature cache's shallow calls).

Wrappers on one module nest in the fixed order of ORDER, whatever order their blocks start in:
autoguidance outermost, then per-image exact batches, bf16 weights, the feature cache, bf16 autocast, and
torch.compile innermost (it compiles the class's own forward, once per process). When a block
ends, by return or by exception, its wrapper leaves the chain; when the last one leaves, the
module's instance `forward` entry is deleted (or put back, if it had one), so its class and
`__dict__` are exactly what they were.

The chain is installed as an instance `forward` (as diffusers' and accelerate's hooks are),
never as a class swap: the class stays the same, so a compiled forward's guards keep matching
across blocks and whatever wraps it. The feature cache's capture of its kept feature is a
wrapper of this same registry on the sub-module it reads ("keep_feature"), not a torch forward hook.

Why not diffusers' `HookRegistry` (diffusers.hooks): its `ModelHook.new_forward` could carry
every wrapper here and can stack and remove them by name, but a hook's place in the chain is
the order of registration (each new one outermost), which would make the nesting depend on
which block starts first; and removing the last hook leaves the module with an instance
`forward` and a `_diffusers_hook` attribute, so it is not exactly as before. The registry below
is the same idea, kept in order, leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable

import torch

# Outermost first. A wrapper runs inside every one listed before it on the same module.
ORDER = (
    "autoguidance",  # replaces the uncond rows of late steps; calls the rest on the cond rows only
    "per_image",  # one image's rows at a time: a batch equals its single runs, bit for bit
    "bf16_weights",  # the module on bf16 copies of its weights (outside the cache: its shallow calls see them too)
    "feature_cache",  # skips the deep blocks on most calls
    "keep_feature",  # the feature cache's capture of a sub-module's output (it only looks)
    "bf16",  # bfloat16 autocast around the UNet
    "compile",  # torch.compile of the class's forward (innermost: it replaces that forward, not wraps it)
)

Wrap = Callable[[Callable], Callable]


class _Hooks:
    """The wrappers on one module, and the forward they wrap (the module's own, as found)."""

    def __init__(self, module: torch.nn.Module):
        self.had = "forward" in module.__dict__  # an instance forward already there (e.g. accelerate's offload hook)
        self.before = module.__dict__.get("forward")
        self.base = module.forward
        self.wraps: dict[str, Wrap] = {}
        self.chain: Callable = self.base

        def forward(*args, **kwargs):
            return self.chain(*args, **kwargs)

        self.forward = functools.update_wrapper(forward, self.base)  # keeps forward's signature for inspect
        module.forward = self.forward

    def rebuild(self) -> None:
        chain = self.base
        for name in reversed([n for n in ORDER if n in self.wraps]):  # innermost first
            chain = self.wraps[name](chain)
        self.chain = chain

    def restore(self, module: torch.nn.Module) -> None:
        if module.__dict__.get("forward") is not self.forward:
            return  # something wrapped over this chain and is still on; the chain, now empty, just calls base
        if self.had:
            module.forward = self.before
        else:
            del module.forward  # back to the class's forward


_REGISTRY: weakref.WeakKeyDictionary[torch.nn.Module, _Hooks] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def hooked(module: torch.nn.Module, name: str, wrap: Wrap):
    """Calls of `module` go through `wrap(forward)` for the block, at `name`'s place in ORDER."""
    if name not in ORDER:
        raise ValueError(f"unknown hook {name!r}; add it to t2i.speed.hooks.ORDER at its place")
    hooks = _REGISTRY.get(module)
    if hooks is not None and name in hooks.wraps:
        raise ValueError(f"hook {name!r} is already on this {type(module).__name__}; end its block first")
    if hooks is None:
        hooks = _REGISTRY[module] = _Hooks(module)
    hooks.wraps[name] = wrap
    try:
        hooks.rebuild()
        yield
    finally:
        del hooks.wraps[name]
        hooks.rebuild()
        if not hooks.wraps:
            hooks.restore(module)
            del _REGISTRY[module]


def hook_names(module: torch.nn.Module) -> list[str]:
    """The wrappers on `module` now, outermost first."""
    hooks = _REGISTRY.get(module)
    return [n for n in ORDER if hooks is not None and n in hooks.wraps]


@functools.lru_cache(maxsize=None)
def compiled_forward(cls: type, backend: str) -> Callable:
    """torch.compile of `cls.forward`, made once per process: its compiled code is reused by every block."""
    return torch.compile(cls.forward, backend=backend, dynamic=False)


def _output_as(out, dtype: torch.dtype):
    """A UNet's output (tuple or UNet2DConditionOutput) with its sample cast to `dtype`."""
    if isinstance(out, tuple):
        return (out[0].to(dtype), *out[1:])
    out.sample = out.sample.to(dtype)
    return out


@contextlib.contextmanager
def exact_batch(pipe, exact: bool):
    """`pipe.exact_batch` for the block: True evaluates the UNet one image at a time (pipelines.unet_calls)."""
    before, pipe.exact_batch = pipe.exact_batch, exact
    try:
        yield
    finally:
        pipe.exact_batch = before
