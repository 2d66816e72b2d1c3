"""Speed and memory switches for t2i's pipeline objects; each undoes itself when its block ends.

    from t2i import speed

    with speed.apply(pipe, speed.SpeedOptions()):          # the measured-safe defaults for this machine
        images = pipe("a red circle", batch=16).images
    with speed.apply(pipe, speed.SpeedOptions.parse("batched,cache3")):
        ...

Every switch acts on the loaded modules (`pipe.pipe.unet`, `pipe.pipe.vae`) or on
`pipe.exact_batch`; none forks diffusers' denoising loop. Where one must act on
every UNet call (bf16 autocast, feature caching, torch.compile) it wraps the
UNet's forward through `hooks.hooked`, the one mechanism, in its fixed order.
After the block the pipeline makes its plain images again, bit for bit (tested).
`t2i bench --options ...` measures each switch against stock diffusers and
against t2i's plain path; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch

from t2i.errors import UsageError
from t2i.speed.cache import feature_cache
from t2i.speed.hooks import _output_as, compiled_forward, exact_batch, hooked


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16); without it autocast is slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@dataclass(frozen=True)
class SpeedOptions:
    """Which switches `apply` turns on. `SpeedOptions()` is the set measured safe and faster on CPU.

    The defaults are the switches that measured faster at no cost to the images' quality on a CPU
    (docs/benchmarks.md has the numbers): `batched` (one UNet call for a batch), `sdpa` (diffusers'
    own default), and bf16 autocast only where the CPU has bf16 instructions (elsewhere it is
    emulated, and slower). Off: channels_last and compile (no gain measured on a CPU), the feature
    cache (it changes the images) and the memory options.

    batched            one UNet call for the whole batch (`exact_batch` off): images equal single runs
                       only to within float rounding, not bit for bit
    channels_last      UNet and VAE weights in channels-last memory format
    sdpa               True: attention through torch's scaled_dot_product_attention (AttnProcessor2_0);
                       False: diffusers' classic AttnProcessor (for comparison); None: as loaded
    bf16               bfloat16 autocast of the UNet on CPU; None: on only where the CPU has bf16
                       instructions (avx512_bf16 / amx_bf16)
    compile            torch.compile of the UNet's forward (True: inductor, or a backend name)
    cache_interval     DeepCache-style feature reuse: every N-th UNet call runs whole, the ones between
                       only the outermost blocks (1 = off); changes the images, needs `batched`
    cache_layers       how much of the last up block the calls between run: 0 = all of it and the first
                       down block (`cacheN`), k = only its last k layers (`cacheN:k`; `cacheN:1` is
                       DeepCache's shallowest branch: least work, most reuse)
    attention_slicing  attention in slices (less memory, slower)
    vae_tiling         decode large images in tiles (less memory)
    cpu_offload        keep each model on the CPU until it runs (CUDA only; batches the UNet)
    tiny_vae           decode with a small decoder (a diffusers AutoencoderTiny, TAESD-style): "" = the
                       model folder's own vae_tiny/, else a folder or hub id; None = the model's VAE
    """

    batched: bool = True
    channels_last: bool = False
    sdpa: bool | None = True
    bf16: bool | None = None
    compile: bool | str = False
    cache_interval: int = 1
    cache_layers: int = 0
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    tiny_vae: str | None = None

    @classmethod
    def off(cls) -> "SpeedOptions":
        """Nothing switched: t2i's plain path (exact per-image batches, modules as loaded)."""
        return cls(batched=False, sdpa=None, bf16=False)

    @classmethod
    def parse(cls, text: str) -> "SpeedOptions":
        """`batched,channels_last,cache3` -> those switches on, everything else off (see OPTION_NAMES)."""
        options = cls.off()
        for name in [n.strip() for n in text.split(",") if n.strip()]:
            options = dataclasses.replace(options, **option_fields(name))
        return options

    def resolved(self, device: torch.device) -> "SpeedOptions":
        """`bf16=None` decided for this device (CPU autocast only; CUDA pipelines choose their dtype on loading)."""
        if self.bf16 is None:
            return dataclasses.replace(self, bf16=device.type == "cpu" and cpu_has_bf16())
        return self

    @property
    def exact(self) -> bool:
        """Image i of a batch bit-identical to the single run with seed + i (each image's rows a UNet call)."""
        return not (self.batched or self.cache_interval > 1 or self.cpu_offload)

    def names(self) -> list[str]:
        """The switches that differ from the plain path, by the names `parse` takes."""
        out = [f for f in ("batched", "channels_last", "bf16", "attention_slicing", "vae_tiling", "cpu_offload")
               if getattr(self, f)]
        out += [] if self.sdpa is None else ["sdpa" if self.sdpa else "no_sdpa"]
        out += [] if not self.compile else ["compile" if self.compile is True else f"compile={self.compile}"]
        if self.cache_interval > 1:
            out += [f"cache{self.cache_interval}" + (f":{self.cache_layers}" if self.cache_layers else "")]
        if self.tiny_vae is not None:
            out += ["tiny_vae" + (f"={self.tiny_vae}" if self.tiny_vae else "")]
        return out


OPTION_NAMES = ["batched", "channels_last", "sdpa", "no_sdpa", "bf16", "compile", "cacheN[:K]", "attention_slicing",
                "vae_tiling", "cpu_offload", "tiny_vae[=PATH]"]


def option_fields(name: str) -> dict:
    """One option name (`cache3`, `compile=eager`, `no_sdpa`, ...) as SpeedOptions fields."""
    key, _, value = name.partition("=")
    if key in ("batched", "channels_last", "bf16", "attention_slicing", "vae_tiling", "cpu_offload") and not value:
        return {key: True}
    if key in ("sdpa", "no_sdpa") and not value:
        return {"sdpa": key == "sdpa"}
    if key == "compile":
        return {"compile": value or True}
    if key == "tiny_vae":
        return {"tiny_vae": value}
    if key.startswith("cache") and not value:
        digits, _, layers = key[len("cache"):].partition(":")
        if digits.isdigit() and int(digits) >= 1 and (layers.isdigit() and int(layers) >= 1 or not _):
            return {"cache_interval": int(digits), "cache_layers": int(layers or 0)}
    raise UsageError(f"unknown speed option {name!r}; choose from: {', '.join(OPTION_NAMES)} (e.g. cache3)")


@contextlib.contextmanager
def apply(pipe, options: SpeedOptions | None = None):
    """Turn `options` on for `pipe` (a t2i pipeline object) for the block; everything is undone after it.

    Yields the FeatureCache when `cache_interval` > 1 (its counters say how many UNet calls ran whole), else None.
    """
    o = (options or SpeedOptions()).resolved(pipe.device)
    if o.cpu_offload and pipe.device.type != "cuda":  # checked before anything changes
        raise UsageError(f"cpu_offload needs a CUDA device (this pipeline is on {pipe.device.type}); leave it off")
    if o.cache_interval > 1 and o.cpu_offload:
        raise UsageError("feature caching and cpu_offload do not combine; choose one")
    with contextlib.ExitStack() as stack:
        before, pipe.speed = pipe.speed, o.names()  # recorded in each image's settings, replayed by reproduce
        stack.callback(setattr, pipe, "speed", before)
        # The forward wrappers (compile, bf16, the cache) nest in hooks.ORDER whatever the order here.
        # The cache holds one whole UNet call's rows; it and cpu_offload batch the UNet (SpeedOptions.exact).
        stack.enter_context(exact_batch(pipe, exact=o.exact))
        if o.channels_last:
            stack.enter_context(channels_last(pipe))
        if o.sdpa is not None or o.attention_slicing:
            stack.enter_context(attention(pipe, sdpa=o.sdpa, slicing=o.attention_slicing))
        if o.vae_tiling:
            stack.enter_context(vae_tiling(pipe))
        if o.compile:
            stack.enter_context(compiled(pipe, backend="inductor" if o.compile is True else o.compile))
        if o.bf16:
            stack.enter_context(bf16_autocast(pipe))
        cache = stack.enter_context(feature_cache(pipe, o.cache_interval, o.cache_layers)) if o.cache_interval > 1 else None
        if o.tiny_vae is not None:
            stack.enter_context(tiny_vae(pipe, o.tiny_vae))
        if o.cpu_offload:
            stack.enter_context(cpu_offload(pipe))
        yield cache


# ---------------------------------------------------------------------------------------------- the switches


def batched(pipe):
    """One UNet call for the whole batch (images equal single runs to within float rounding)."""
    return exact_batch(pipe, exact=False)


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
def attention(pipe, sdpa: bool | None = True, slicing: bool = False):
    """Attention processors of the UNet and VAE: SDPA (True) or classic matmul-softmax (False), sliced or not."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    modules = [m for m in (pipe.pipe.unet, pipe.pipe.vae) if hasattr(m, "set_attn_processor")]
    saved = [m.attn_processors for m in modules]  # name -> processor, restored as they were
    try:
        if sdpa is not None:
            for m in modules:
                m.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
        if slicing:
            pipe.pipe.unet.set_attention_slice("auto")  # half the heads at a time
        yield
    finally:
        for m, processors in zip(modules, saved):
            m.set_attn_processor(processors)


@contextlib.contextmanager
def vae_tiling(pipe):
    """VAE decoding in overlapping tiles (for images larger than the VAE's tile size; smaller ones are untouched)."""
    vae = pipe.pipe.vae
    before = vae.use_tiling
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = before


@contextlib.contextmanager
def tiny_vae(pipe, source: str = ""):
    """Decode with a small decoder (TAESD-style AutoencoderTiny) instead of the model's VAE; img2img and
    inpainting still encode with the model's VAE, so their latents are unchanged.

    `source`: a folder or hub id; "" = the model folder's own vae_tiny/ (the bundled model has one).
    """
    from t2i.models import tiny_vae as small

    folder = small.tiny_vae_folder(source, pipe.model.path)
    decoder = small.load_tiny_vae(folder, pipe.dtype, pipe.device, pipe.pipe.unet.config.out_channels)
    before, pipe.decoder = pipe.decoder, decoder
    try:
        yield decoder
    finally:
        pipe.decoder = before


@contextlib.contextmanager
def cpu_offload(pipe):
    """accelerate's model offload: each model moves to the GPU only while it runs (CUDA only)."""
    if pipe.device.type != "cuda":
        raise UsageError(f"cpu_offload needs a CUDA device (this pipeline is on {pipe.device.type}); leave it off")
    device = pipe.device
    pipe.pipe.enable_model_cpu_offload(device=device)
    try:
        yield
    finally:
        pipe.pipe.remove_all_hooks()
        pipe.pipe.to(device)


def bf16_autocast(pipe):
    """The UNet under CPU bfloat16 autocast; its output is cast back to the latents' dtype for the scheduler."""
    def wrap(forward):
        def forward_bf16(sample, *args, **kwargs):
            with torch.autocast(sample.device.type, dtype=torch.bfloat16):
                out = forward(sample, *args, **kwargs)
            return _output_as(out, sample.dtype)
        return forward_bf16

    return hooked(pipe.pipe.unet, "bf16", wrap)


def compiled(pipe, backend: str = "inductor"):
    """torch.compile of the UNet's forward (the first call compiles: minutes on a CPU, then faster steps).

    The compiled forward is made once per process and the UNet's class never changes, so it
    compiles once per process, with the other options' wrappers around it or not.
    """
    unet = pipe.pipe.unet
    forward = compiled_forward(type(unet), backend)
    return hooked(unet, "compile", lambda _class_forward: partial(forward, unet))
