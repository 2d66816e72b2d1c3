"""Speed and memory switches for t2i's pipeline objects; each undoes itself when its block ends.

    from t2i import speed

    with speed.apply(pipe, speed.SpeedOptions.parse("batched,cache3")):
        images = pipe("a red circle", batch=16).images

`options` parses and applies the switches, `cache` is DeepCache-style feature
reuse, `hooks` the one way they (and the pipelines' per-image and autoguided UNet calls)
wrap a UNet's forward.
"""

from t2i.speed.cache import FeatureCache, feature_cache
from t2i.speed.hooks import exact_batch, hooked
from t2i.speed.options import (
    OPTION_NAMES,
    SpeedOptions,
    apply,
    attention,
    batched,
    bf16_autocast,
    channels_last,
    compiled,
    cpu_has_bf16,
    cpu_offload,
    option_fields,
    tiny_vae,
    vae_tiling,
)

__all__ = ["OPTION_NAMES", "FeatureCache", "SpeedOptions", "apply", "attention", "batched", "bf16_autocast",
           "channels_last", "compiled", "cpu_has_bf16", "cpu_offload", "exact_batch", "feature_cache", "hooked",
           "option_fields", "tiny_vae", "vae_tiling"]
