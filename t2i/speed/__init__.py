"""Speed and memory switches for t2i's pipeline objects; each undoes itself when its block ends.

    from t2i import speed

    pipe.speed = "exact"          # a pipeline's own mode for its calls: "auto" (the default), "exact", or names
    with speed.apply(pipe, speed.SpeedOptions.parse("batched,cache3")):   # or options for a block
        images = pipe("a red circle", batch=16).images

`options` parses and applies the switches (and decides `auto` per device), `bf16` runs modules on
bf16 copies of their weights, `cache` is DeepCache-style feature reuse, `hooks` the one way they (and
the pipelines' per-image and autoguided UNet calls) wrap a UNet's forward.
"""

from t2i.speed.bf16 import Bf16Decoder, bf16_decoder, bf16_weights
from t2i.speed.cache import FeatureCache, feature_cache
from t2i.speed.hooks import exact_batch, hooked
from t2i.speed.options import (
    OPTION_NAMES,
    SpeedOptions,
    apply,
    auto_choice,
    attention,
    batched,
    bf16_autocast,
    channels_last,
    compiled,
    cpu_has_bf16,
    cpu_offload,
    option_fields,
    per_call,
    tiny_vae,
    vae_tiling,
)

__all__ = ["OPTION_NAMES", "Bf16Decoder", "FeatureCache", "SpeedOptions", "apply", "attention", "auto_choice",
           "batched", "bf16_autocast", "bf16_decoder", "bf16_weights", "channels_last", "compiled", "cpu_has_bf16",
           "cpu_offload", "exact_batch", "feature_cache", "hooked", "option_fields", "per_call", "tiny_vae",
           "vae_tiling"]
