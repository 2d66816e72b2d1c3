"""Speed switches for t2i's pipeline objects, each a context manager that undoes itself.

    with speed.feature_cache(pipe, 3), speed.channels_last(pipe):
        images = pipe("a red circle", batch=16).images

`t2i bench` measures each against stock diffusers; the README has the numbers.
None is on by default yet: only `batched` keeps outputs within rounding, and
`feature_cache` (2x on the demo model) changes images (measured in the README).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def channels_last(pipe):
    """UNet and VAE in channels-last memory format for the block (oneDNN/cuDNN convolutions may prefer it)."""
    modules = [pipe.pipe.unet, pipe.pipe.vae]
    for m in modules:
        m.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def batched(pipe):
    """One UNet call for the whole batch (images equal single runs to within float rounding)."""
    before, pipe.exact_batch = pipe.exact_batch, False
    try:
        yield
    finally:
        pipe.exact_batch = before


@contextlib.contextmanager
def feature_cache(pipe, interval: int = 2):
    """DeepCache-style reuse of deep UNet features (Ma et al., 2023): every `interval`-th step runs the whole
    UNet and keeps the input of its last up block; the steps between run only the shallow path (conv_in, the
    first down block, the last up block, the output layers) on that kept feature and fresh skip connections.

    Wraps the UNet's submodules for the block; works on whole UNet calls, so it batches the images
    (`exact_batch` off). A new pipeline call (the timestep goes up again) always starts with a full step.
    """
    unet = pipe.pipe.unet
    deep_down, deep_up, last_deep = list(unet.down_blocks[1:]), list(unet.up_blocks[:-2]), unet.up_blocks[-2]
    state = {"step": 0, "t": None, "kept": None, "shallow": False}

    def residual_count(block) -> int:
        return len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)

    def down_stub(block):
        def forward(hidden_states, *args, **kwargs):
            return hidden_states, (hidden_states,) * residual_count(block)  # never read: the up stubs ignore them
        return forward

    def passthrough(hidden_states=None, *args, **kwargs):
        return hidden_states if hidden_states is not None else args[0]

    def kept(*args, **kwargs):
        return state["kept"]

    stubs = {**{b: down_stub(b) for b in deep_down}, unet.mid_block: passthrough,
             **{b: passthrough for b in deep_up}, last_deep: kept}

    def before_unet(module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if state["t"] is None or t >= state["t"]:  # a new call: start over with a full step
            state["step"] = 0
        state["t"] = t
        state["shallow"] = state["step"] % interval != 0 and state["kept"] is not None
        state["step"] += 1
        for block, stub in stubs.items():
            if state["shallow"]:
                block.forward = stub
            elif "forward" in block.__dict__:
                del block.forward

    def keep(module, args, output):
        if not state["shallow"]:
            state["kept"] = output

    handles = [unet.register_forward_pre_hook(before_unet, with_kwargs=True), last_deep.register_forward_hook(keep)]
    before, pipe.exact_batch = pipe.exact_batch, False
    try:
        yield
    finally:
        pipe.exact_batch = before
        for h in handles:
            h.remove()
        for block in stubs:
            block.__dict__.pop("forward", None)
