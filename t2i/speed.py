"""Speed and memory switches for t2i's pipeline objects; each undoes itself when its block ends.

    from t2i import speed

    with speed.apply(pipe, speed.SpeedOptions()):          # the measured-safe defaults for this machine
        images = pipe("a red circle", batch=16).images
    with speed.apply(pipe, speed.SpeedOptions.parse("batched,cache3")):
        ...

Every switch acts on the loaded modules (`pipe.pipe.unet`, `pipe.pipe.vae`) or on
`pipe.exact_batch`; none forks diffusers' denoising loop. Where one must act on
every UNet call (bf16 autocast, feature caching, torch.compile) it wraps the
UNet's forward. After the block the pipeline makes its plain images again, bit
for bit (tested). `t2i bench --options ...` measures each switch against stock
diffusers and against t2i's plain path; the README has the numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UsageError


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

    The defaults, from `t2i bench` on a 2-core AVX2 CPU (no bf16 instructions): `batched` (same
    image at batch 1, 2.5x faster at batch 16 than exact per-image rows), `sdpa` (diffusers' own
    default; the classic processor is ~10% slower), bf16 only where the CPU has it (forced on
    AVX2 it is 12x slower). Off: channels_last (~10% slower here), compile (about 2 minutes to
    compile, no measurable gain), the feature cache (2x, but it changes the images), and the
    memory options.

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
        # Order matters: forward wrappers nest inside out (compile innermost, the cache outermost).
        # The cache holds one UNet call's rows; accelerate's offload hook is an instance `forward`, which
        # per-image evaluation would delete after its first call: both run the batch in one call.
        stack.enter_context(_exact_batch(pipe, exact=o.exact))
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


@contextlib.contextmanager
def _exact_batch(pipe, exact: bool):
    before, pipe.exact_batch = pipe.exact_batch, exact
    try:
        yield
    finally:
        pipe.exact_batch = before


def batched(pipe):
    """One UNet call for the whole batch (images equal single runs to within float rounding)."""
    return _exact_batch(pipe, exact=False)


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
    from . import loading

    folder = loading.tiny_vae_folder(source, pipe.model.path)
    decoder = loading.load_tiny_vae(folder, pipe.dtype, pipe.device, pipe.pipe.unet.config.out_channels)
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


_SUBCLASSES: dict = {}  # (class, key) -> the wrapped subclass, reused so torch.compile's guards keep matching


@contextlib.contextmanager
def wrapped_forward(module: torch.nn.Module, wrap, key=None):
    """Replace `module`'s forward by `wrap(forward)` for the block.

    The wrapper goes on a subclass, not on the instance: t2i's per-image UNet
    evaluation (pipelines.base.per_image_unet) sets and deletes an instance `forward`
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


def bf16_autocast(pipe):
    """The UNet under CPU bfloat16 autocast; its output is cast back to the latents' dtype for the scheduler."""
    def wrap(forward):
        def forward_bf16(self, sample, *args, **kwargs):
            with torch.autocast(sample.device.type, dtype=torch.bfloat16):
                out = forward(self, sample, *args, **kwargs)
            return _output_as(out, sample.dtype)
        return forward_bf16

    return wrapped_forward(pipe.pipe.unet, wrap)


def compiled(pipe, backend: str = "inductor"):
    """torch.compile of the UNet's forward (the first call compiles: minutes on a CPU, then faster steps).

    Alone (or with `batched`/`channels_last`) it compiles once per process; combined with
    bf16 or the feature cache, whose wrappers are made per block, it recompiles per block.
    """
    return wrapped_forward(pipe.pipe.unet, lambda forward: torch.compile(forward, backend=backend, dynamic=False),
                           key=("compile", backend))


# ---------------------------------------------------------------------------------------------- feature caching


class FeatureCache:
    """DeepCache-style reuse of the UNet's deep features (Ma et al., 2023, "DeepCache: Accelerating Diffusion
    Models for Free").

    Every `interval`-th UNet call runs whole and keeps the input of the last up block
    (the output of `up_blocks[-2]`). The calls between run only the shallow path:
    conv_in and the time embedding, `down_blocks[0]` (fresh skip connections), the last
    up block on the kept feature, and the output layers. Adjacent denoising steps
    change the deep features little, so most of the UNet's work is skipped.

    With `layers` = k > 0 the cut is inside the last up block: the full call keeps the
    input of its last k layers, and the shallow path runs only those layers and the
    down layers whose skip connections they read (k = 1: conv_in, one up layer, the
    output layers; DeepCache's default branch).

    The cache starts over (a full call) at the start of each pipeline call (a new
    scheduler, or its step index reset), when the timestep goes up, and when the
    batch's shape changes. Classifier-free guidance's uncond and cond rows are one
    batch and are kept together. Counters: `full_calls`, `shallow_calls`.
    """

    def __init__(self, unet, interval: int, scheduler_of=lambda: None, layers: int = 0):
        last = unet.up_blocks[-1]
        if not 0 <= layers <= len(last.resnets):
            raise UsageError(f"cache layers {layers}: this UNet's last up block has {len(last.resnets)} layers; "
                             f"use 1 to {len(last.resnets)} (or none for the whole block)")
        self.unet, self.interval, self.scheduler_of = unet, interval, scheduler_of
        self.first_layer = len(last.resnets) - layers if layers else 0  # the first up layer the shallow path runs
        self.full_calls = self.shallow_calls = 0
        self.reset()

    def reset(self) -> None:
        self.kept: torch.Tensor | None = None
        self.since_full = 0
        self.last_t: float | None = None
        self.scheduler = None

    def _new_run(self, sample: torch.Tensor, t: float) -> bool:
        scheduler = self.scheduler_of()
        fresh = (scheduler is not self.scheduler or getattr(scheduler, "step_index", 0) is None
                 or self.last_t is None or t > self.last_t
                 or self.kept is None or self.kept.shape[0] != sample.shape[0])
        self.scheduler, self.last_t = scheduler, t
        return fresh

    def wrap(self, forward):
        cache = self

        def cached_forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs):
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            if cache._new_run(sample, t):
                cache.since_full = 0
            extra = [kwargs.get(k) for k in ("down_block_additional_residuals", "mid_block_additional_residual",
                                             "down_intrablock_additional_residuals")]
            if cache.since_full % cache.interval == 0 or args or any(x is not None for x in extra):
                cache.since_full, cache.full_calls = 1, cache.full_calls + 1
                return forward(unet, sample, timestep, encoder_hidden_states, *args, **kwargs)
            cache.since_full, cache.shallow_calls = cache.since_full + 1, cache.shallow_calls + 1
            return cache.shallow(sample, timestep, encoder_hidden_states, **kwargs)

        return cached_forward

    def keep(self, module, args, output) -> None:
        """Forward hook on what feeds the first shallow layer: (rows, C, h, w), from a tensor or an attention's
        (tensor,) / output object."""
        self.kept = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)

    def hook_target(self) -> torch.nn.Module:
        """The module whose output is kept: `up_blocks[-2]`, or the last up block's layer before the cut."""
        last, k = self.unet.up_blocks[-1], self.first_layer
        if k == 0:
            return self.unet.up_blocks[-2]
        return last.attentions[k - 1] if getattr(last, "attentions", None) else last.resnets[k - 1]

    def shallow(self, sample, timestep, encoder_hidden_states, timestep_cond=None, attention_mask=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, encoder_attention_mask=None, class_labels=None,
                return_dict: bool = True):
        """The UNet's outermost blocks on the kept deep feature (diffusers' UNet2DConditionModel.forward, cut short)."""
        unet = self.unet
        if attention_mask is not None:  # as diffusers: a 0/1 mask becomes an additive bias
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._embedding(sample, timestep, timestep_cond, class_labels, encoder_hidden_states,
                              added_cond_kwargs)  # (rows, D)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)  # (rows, L, E)
        h = unet.conv_in(sample)  # (rows, C0, h, w)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        attn = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                    cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask,
                    return_dict=False)
        n = len(last.resnets)  # its skips: conv_in's output, then one per layer of the first down block
        skips = [h]
        for i in range(n - 1 - self.first_layer):  # only the down layers whose skips the shallow layers read
            h = first.resnets[i](h, emb)
            if getattr(first, "attentions", None):
                h = first.attentions[i](h, **attn)[0]
            skips.append(h)
        out = self.kept
        for j in range(self.first_layer, n):  # diffusers' up block loop, from the cut on; layer j reads skip n-1-j
            out = last.resnets[j](torch.cat([out, skips[n - 1 - j]], dim=1), emb)
            if getattr(last, "attentions", None):
                out = last.attentions[j](out, **attn)[0]
        for upsampler in last.upsamplers or []:
            out = upsampler(out)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)  # (rows, C_out, h, w)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _embedding(self, sample, timestep, timestep_cond, class_labels, encoder_hidden_states, added_cond_kwargs):
        """The time (+ class, + SDXL's text-time) embedding, as diffusers computes it."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


@contextlib.contextmanager
def feature_cache(pipe, interval: int = 2, layers: int = 0):
    """Feature caching (see FeatureCache) for the block; yields the cache. Batches the UNet (`exact_batch` off):
    the cache holds one whole UNet call's rows."""
    unet = pipe.pipe.unet
    if interval < 1:
        raise UsageError(f"cache interval {interval} must be 1 (off) or more")
    if unet.config.get("addition_embed_type") == "image_hint":
        raise UsageError("feature caching does not support image-hint UNets (Kandinsky-style); leave it off")
    cache = FeatureCache(unet, interval, scheduler_of=lambda: pipe.pipe.scheduler, layers=layers)
    handle = cache.hook_target().register_forward_hook(cache.keep)
    try:
        with _exact_batch(pipe, exact=False), wrapped_forward(unet, cache.wrap):
            yield cache
    finally:
        handle.remove()
        cache.reset()  # drop the kept tensor
