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
import functools
import json
from dataclasses import dataclass
from functools import partial

import torch

from t2i import devices
from t2i.choices import SPEED_MODES, SPEED_OPTIONS
from t2i.errors import UsageError
from t2i.speed.bf16 import bf16_decoder, bf16_weights
from t2i.speed.cache import feature_cache
from t2i.speed.hooks import _output_as, compiled_forward, exact_batch, hooked


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (see t2i.devices.cpu_has_bf16, the one place it is read)."""
    return devices.cpu_has_bf16()


def auto_choice(device_type: str, dtype: torch.dtype, cpu_bf16: bool, model_allows_bf16: bool = True) -> dict:
    """What `--speed auto` switches on, from the device's capabilities alone (a pure function; tests pin it).

    Everywhere: one UNet call per batch (`batched`) and SDPA attention. On a CPU with bf16 instructions
    (AVX512-BF16 / AMX), an fp32 pipeline runs its UNet and text encoder(s) on bf16 copies of their weights
    and decodes with a bf16 VAE (its NaN guard retries in fp32) -- what stock diffusers' `torch_dtype=bfloat16`
    does, with the scheduler's arithmetic and the latents kept in fp32. On a CPU without them bf16 is emulated
    and slower, so fp32 stays. On CUDA the pipeline's dtype is already fp16/bf16 (`--dtype auto`). A model
    folder's t2i.json may say `"auto_bf16": false` where bf16 costs that model measurable quality.
    channels_last and compile stay off: neither measured faster on a CPU (docs/benchmarks.md).
    """
    bf16 = device_type == "cpu" and dtype == torch.float32 and cpu_bf16 and model_allows_bf16
    return {"batched": True, "sdpa": True, "bf16": False, "bf16_weights": bf16, "bf16_vae": bf16}


def model_allows_bf16(pipe) -> bool:
    """The model folder's t2i.json `auto_bf16` (default true): false keeps `auto` in fp32 for that model."""
    path = getattr(getattr(pipe, "model", None), "path", None)
    extra = path / "t2i.json" if path is not None and path.is_dir() else None
    if extra is None or not extra.is_file():
        return True
    try:
        return bool(json.loads(extra.read_text()).get("auto_bf16", True))
    except (json.JSONDecodeError, AttributeError):
        return True


@dataclass(frozen=True)
class SpeedOptions:
    """Which switches `apply` turns on. `SpeedOptions()` is `auto`: what measures faster on the device.

    The defaults are the switches that measured faster at no cost to the images' quality
    (docs/benchmarks.md has the numbers): `batched` (one UNet call for a batch), `sdpa` (diffusers'
    own default), and, where the CPU has bf16 instructions, bf16 weights for the UNet and text encoder and
    a bf16 VAE (None: decided per device by `resolved`, see `auto_choice`). Off: channels_last and compile
    (no gain measured on a CPU), the feature cache (it changes the images) and the memory options.
    `SpeedOptions.off()` (`exact`) is the bit-exact fp32 path.

    batched            one UNet call for the whole batch (`exact_batch` off): images equal single runs
                       only to within float rounding, not bit for bit
    channels_last      UNet and VAE weights in channels-last memory format
    sdpa               True: attention through torch's scaled_dot_product_attention (AttnProcessor2_0);
                       False: diffusers' classic AttnProcessor (for comparison); None: as loaded
    bf16               bfloat16 autocast of the UNet on CPU (superseded by bf16_weights: slower, more memory)
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
    bf16_weights       UNet (and guide) and text encoder(s) compute on bf16 copies of their weights, made once
                       and kept beside the fp32 ones (latents and the scheduler stay fp32); None: per device
    bf16_vae           the VAE decodes with bf16 weights; on NaN/inf it decodes again with the fp32 ones
    """

    batched: bool = True
    channels_last: bool = False
    sdpa: bool | None = True
    bf16: bool | None = False
    compile: bool | str = False
    cache_interval: int = 1
    cache_layers: int = 0
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    tiny_vae: str | None = None
    # bf16 weights (issue 28); None: decided per device by `resolved` (auto_choice)
    bf16_weights: bool | None = None
    bf16_vae: bool | None = None

    @classmethod
    def off(cls) -> "SpeedOptions":
        """Nothing switched: t2i's plain path (exact per-image batches, modules as loaded)."""
        return cls(batched=False, sdpa=None, bf16=False, bf16_weights=False, bf16_vae=False)

    @classmethod
    def parse(cls, text: str) -> "SpeedOptions":
        """`batched,channels_last,cache3` -> those switches on, everything else off (see OPTION_NAMES);
        `auto` -> SpeedOptions() (decided per device), `exact` -> off()."""
        names = [n.strip() for n in text.split(",") if n.strip()]
        modes = [n for n in names if n in SPEED_MODES]
        if modes and len(names) > 1:
            raise UsageError(f"speed {modes[0]!r} stands alone; give it alone or list the options you want "
                             f"(e.g. batched,cache3)")
        if modes:
            return cls() if modes[0] == "auto" else cls.off()
        options = cls.off()
        for name in names:
            options = dataclasses.replace(options, **option_fields(name))
        return options

    def resolved(self, device: torch.device, dtype: torch.dtype = torch.float32,
                 allow_bf16: bool = True) -> "SpeedOptions":
        """The fields left None decided for this device and pipeline dtype (see `auto_choice`)."""
        auto = auto_choice(device.type, dtype, cpu_has_bf16(), allow_bf16)
        return dataclasses.replace(self, **{k: auto[k] for k in ("bf16", "bf16_weights", "bf16_vae")
                                            if getattr(self, k) is None})

    @property
    def exact(self) -> bool:
        """Image i of a batch bit-identical to the single run with seed + i (each image's rows a UNet call)."""
        return not (self.batched or self.cache_interval > 1 or self.cpu_offload)

    def names(self) -> list[str]:
        """The switches that differ from the plain path, by the names `parse` takes."""
        out = [f for f in ("batched", "channels_last", "bf16", "attention_slicing", "vae_tiling", "cpu_offload",
                           "bf16_weights", "bf16_vae") if getattr(self, f)]
        out += [] if self.sdpa is None else ["sdpa" if self.sdpa else "no_sdpa"]
        out += [] if not self.compile else ["compile" if self.compile is True else f"compile={self.compile}"]
        if self.cache_interval > 1:
            out += [f"cache{self.cache_interval}" + (f":{self.cache_layers}" if self.cache_layers else "")]
        if self.tiny_vae is not None:
            out += ["tiny_vae" + (f"={self.tiny_vae}" if self.tiny_vae else "")]
        return out


OPTION_NAMES = list(SPEED_OPTIONS)  # t2i.choices holds the names (the CLI lists them without importing torch)


def option_fields(name: str) -> dict:
    """One option name (`cache3`, `compile=eager`, `no_sdpa`, ...) as SpeedOptions fields."""
    key, _, value = name.partition("=")
    if key in ("batched", "channels_last", "bf16", "attention_slicing", "vae_tiling", "cpu_offload", "bf16_weights",
               "bf16_vae") and not value:
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
    o = (options or SpeedOptions()).resolved(pipe.device, pipe.dtype, model_allows_bf16(pipe))
    if o.cpu_offload and pipe.device.type != "cuda":  # checked before anything changes
        raise UsageError(f"cpu_offload needs a CUDA device (this pipeline is on {pipe.device.type}); leave it off")
    if o.cache_interval > 1 and o.cpu_offload:
        raise UsageError("feature caching and cpu_offload do not combine; choose one")
    with contextlib.ExitStack() as stack:
        before, pipe.speed_on = pipe.speed_on, o.names()  # recorded in each image's settings, replayed by reproduce
        stack.callback(setattr, pipe, "speed_on", before)
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
        if o.bf16_weights:
            stack.enter_context(bf16_weights(pipe))
        cache = stack.enter_context(feature_cache(pipe, o.cache_interval, o.cache_layers)) if o.cache_interval > 1 else None
        if o.tiny_vae is not None:
            stack.enter_context(tiny_vae(pipe, o.tiny_vae))
        if o.bf16_vae:  # after tiny_vae: whichever decoder is on decodes in bf16
            stack.enter_context(bf16_decoder(pipe))
        if o.cpu_offload:
            stack.enter_context(cpu_offload(pipe))
        yield cache


def per_call(call):
    """Decorator of a pipeline's `__call__`: its own speed mode (`pipe.speed`: "auto", the default, "exact", or
    option names) on for the call, unless a `speed.apply` block is already on (the CLI's jobs, bench, eval)."""
    @functools.wraps(call)
    def call_with_speed(pipe, *args, **kwargs):
        if pipe.speed_on is not None:
            return call(pipe, *args, **kwargs)
        mode = pipe.speed if isinstance(pipe.speed, str) else ",".join(pipe.speed)
        with apply(pipe, SpeedOptions.parse(mode)):
            return call(pipe, *args, **kwargs)

    return call_with_speed


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
