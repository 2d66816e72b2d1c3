"""DeepCache-style feature caching: the speed options cacheN and cacheN:K."""

from __future__ import annotations

import contextlib

import torch

from t2i.errors import UsageError
from t2i.speed.hooks import exact_batch, hooked


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
        """The UNet's forward as the cache runs it: whole every `interval`-th call, else the shallow path."""
        cache = self

        def cached_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            if cache._new_run(sample, t):
                cache.since_full = 0
            extra = [kwargs.get(k) for k in ("down_block_additional_residuals", "mid_block_additional_residual",
                                             "down_intrablock_additional_residuals")]
            if cache.since_full % cache.interval == 0 or args or any(x is not None for x in extra):
                cache.since_full, cache.full_calls = 1, cache.full_calls + 1
                return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
            cache.since_full, cache.shallow_calls = cache.since_full + 1, cache.shallow_calls + 1
            return cache.shallow(sample, timestep, encoder_hidden_states, **kwargs)

        return cached_forward

    def keep(self, forward):
        """The forward of `hook_target()`, keeping its output: what feeds the first shallow layer, (rows, C, h, w),
        from a tensor or an attention's (tensor,) / output object."""
        def keeping_forward(*args, **kwargs):
            output = forward(*args, **kwargs)
            self.kept = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            return output

        return keeping_forward

    def keeping(self):
        """For the block, every whole UNet call keeps the feature the shallow path starts from."""
        return hooked(self.hook_target(), "keep_feature", self.keep)

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
    try:
        with exact_batch(pipe, exact=False), cache.keeping(), hooked(unet, "feature_cache", cache.wrap):
            yield cache
    finally:
        cache.reset()  # drop the kept tensor
