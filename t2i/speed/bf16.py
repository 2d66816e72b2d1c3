"""bf16 weights: the UNet, the text encoder(s) and the VAE computing in bfloat16, the fp32 modules kept as loaded.

Stock diffusers' fastest CPU flag is `torch_dtype=torch.bfloat16`: every weight, every latent and the
scheduler's arithmetic in bf16. t2i's `bf16_weights` gives the heavy modules the same bf16 weights, but only
while they run: each call swaps each floating parameter's data for a bf16 copy, made once and kept beside
the fp32 tensor (memory: half the weights' size again), and swaps the fp32 tensor back when the call
returns. So

- outside a call the module is exactly as loaded: `exact` after `auto` is bit-exact, a LoRA loads into the
  fp32 modules as always, and `pipe.dtype` stays fp32;
- the latents, the scheduler and the classifier-free guidance sum stay in fp32 (the UNet's inputs are cast
  to bf16 at its door, its output back to fp32);
- a copy is made again only when its fp32 tensor changed (another data pointer or version: a LoRA fused in,
  an optimizer step), so a loop of calls casts once.

`bf16_decoder` decodes with bf16 VAE weights the same way; the NaN guard (t2i.guards.decode_latents) asks
it for fp32 on NaN/inf, and it then decodes with the original fp32 weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.weak import WeakIdKeyDictionary

from t2i.speed.hooks import hooked

BF16 = torch.bfloat16

# fp32 tensor (a parameter or buffer) -> ((data pointer, version) it was copied at, its bf16 copy)
_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _copy(t: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of `t`, made again only when `t` changed since the last one."""
    key = (t.data_ptr(), t._version)
    hit = _COPIES.get(t)
    if hit is not None and hit[0] == key:
        return hit[1]
    copy = t.detach().to(BF16)
    _COPIES[t] = (key, copy)
    return copy


@contextlib.contextmanager
def swapped(module: torch.nn.Module):
    """`module`'s fp32 parameters and buffers hold their bf16 copies for the block; the very fp32 tensors after."""
    params = [p for p in module.parameters() if p.dtype == torch.float32]
    buffers = [(m, k, b) for m in module.modules() for k, b in m._buffers.items()
               if b is not None and b.dtype == torch.float32]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = _copy(p)
        for m, k, b in buffers:
            m._buffers[k] = _copy(b)
        yield
    finally:
        for p, data in zip(params, saved):
            p.data = data
        for m, k, b in buffers:
            m._buffers[k] = b


def _to(obj, dtype: torch.dtype, skip: frozenset = frozenset()):
    """`obj` with its floating tensors cast to `dtype`: a tensor, or a tuple, list or dict (diffusers' and
    transformers' outputs are dicts) of them, one level deep for dicts' values."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        for k in list(obj.keys()):
            if k not in skip and obj[k] is not None:
                obj[k] = _to(obj[k], dtype)
        return obj
    return obj


def _bf16_forward(forward, keep_arg: int | None = None, keep_kw: str | None = None):
    """`forward` on bf16 weights: floating inputs cast to bf16 (but the one at `keep_arg` / `keep_kw`: the UNet's
    timestep, which bf16 would round), floating outputs back to the dtype they came in (fp32)."""
    def forward_bf16(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()), None)
        dtype = first.dtype if first is not None else torch.float32
        args = tuple(a if i == keep_arg else _to(a, BF16) for i, a in enumerate(args))
        kwargs = {k: v if k == keep_kw else _to(v, BF16) for k, v in kwargs.items()}
        return _to(forward(*args, **kwargs), dtype)

    return forward_bf16


@contextlib.contextmanager
def bf16_weights(pipe):
    """The UNet (and the autoguidance guide) and the text encoder(s) on bf16 weights for the block."""
    p = pipe.pipe
    unets = [m for m in (p.unet, getattr(pipe, "guide", None)) if m is not None]
    encoders = [m for m in (getattr(p, "text_encoder", None), getattr(p, "text_encoder_2", None)) if m is not None]
    with contextlib.ExitStack() as stack:
        for unet in unets:
            stack.enter_context(hooked(unet, "bf16_weights", _wrap(unet, keep_arg=1, keep_kw="timestep")))
        for encoder in encoders:
            stack.enter_context(hooked(encoder, "bf16_weights", _wrap(encoder)))
        yield


def _wrap(module, keep_arg: int | None = None, keep_kw: str | None = None):
    """The hook (t2i.speed.hooks) that runs `module`'s forward on its bf16 weights."""
    def wrap(forward):
        inner = _bf16_forward(forward, keep_arg, keep_kw)

        def forward_bf16(*args, **kwargs):
            with swapped(module):
                return inner(*args, **kwargs)
        return forward_bf16
    return wrap


class Bf16Decoder:
    """A VAE decoding with bf16 weights, as `guards.decode_latents` uses a VAE: `.dtype`, `.config`, `.decode`,
    `.to(dtype)`. `.to(torch.float32)` (the NaN guard's retry) makes it decode with the original fp32 weights."""

    def __init__(self, vae):
        self.vae, self.config, self.dtype = vae, vae.config, BF16

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        if dtype is not None:
            self.dtype = dtype
        devs = [a for a in args if not isinstance(a, torch.dtype) and a is not None]
        if devs:
            self.vae.to(devs[0])
        return self

    def decode(self, latents: torch.Tensor, *args, **kwargs):
        if self.dtype != BF16:
            return self.vae.decode(latents.to(self.vae.dtype), *args, **kwargs)
        with swapped(self.vae):
            return self.vae.decode(latents.to(BF16), *args, **kwargs)


@contextlib.contextmanager
def bf16_decoder(pipe):
    """The pipeline decodes with bf16 VAE weights for the block (its small decoder, when `tiny_vae` set one)."""
    vae = pipe.decoder if pipe.decoder is not None else pipe.pipe.vae
    if vae.dtype != torch.float32:  # a half-precision pipeline decodes in its own dtype already
        yield
        return
    before, pipe.decoder = pipe.decoder, Bf16Decoder(vae)
    try:
        yield
    finally:
        pipe.decoder = before
