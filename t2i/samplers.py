"""Samplers by name: a plain registry of diffusers schedulers.

Each entry names a diffusers scheduler class (imported when first used, so that
reading metadata never imports diffusers) plus the config overrides that make it
the sampler A1111 users know under its display name. Swapping a sampler is
changing one name: `make_scheduler("dpm++2m-karras", base_config)`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

from t2i.errors import UsageError, did_you_mean

# torchsde complains about float rounding of the first Brownian-tree query on every
# DPM++ SDE run; the result is correct and a user cannot act on it.
warnings.filterwarnings("ignore", message="Should have ta>=t0", category=UserWarning)


@dataclass(frozen=True)
class Sampler:
    name: str  # t2i's name, e.g. "dpm++2m-karras"
    a1111: str  # A1111's display name, e.g. "DPM++ 2M Karras"
    scheduler_class: str  # a diffusers scheduler, imported on first use
    options: dict[str, Any] = field(default_factory=dict)
    # Draws fresh noise each step from the per-image generators (k-diffusion "ancestral"/SDE).
    stochastic: bool = False
    # One noise source for the whole batch: a batch differs from single runs unless split.
    batch_coupled: bool = False

    @property
    def scheduler(self) -> type:
        import diffusers  # deferred: reading a PNG's metadata (`t2i info`) checks sampler names without diffusers

        return getattr(diffusers, self.scheduler_class)


_KARRAS = {"use_karras_sigmas": True}
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("euler", "Euler", "EulerDiscreteScheduler"),
        Sampler("euler-a", "Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
        Sampler("heun", "Heun", "HeunDiscreteScheduler"),
        Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
        Sampler("dpm2-karras", "DPM2 Karras", "KDPM2DiscreteScheduler", _KARRAS),
        Sampler("dpm2-a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True),
        Sampler("ddim", "DDIM", "DDIMScheduler", {"set_alpha_to_one": False}),
        Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
        Sampler("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        Sampler(
            "dpm++2m-karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", **_KARRAS},
        ),
        Sampler(
            "dpm++2m-sde-karras", "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", **_KARRAS}, stochastic=True,
        ),
        Sampler(
            "dpm++sde-karras", "DPM++ SDE Karras", "DPMSolverSDEScheduler", _KARRAS,
            stochastic=True, batch_coupled=True,
        ),
        Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
        Sampler("lcm", "LCM", "LCMScheduler"),
    ]
}
DEFAULT_SAMPLER = "dpm++2m-karras"


def _key(name: str) -> str:
    return "".join(name.lower().split()).replace("_", "-")


# A1111 display names and a few spellings people type, all folded by _key.
ALIASES: dict[str, str] = {_key(s.a1111): s.name for s in SAMPLERS.values()}
ALIASES |= {_key(s.name): s.name for s in SAMPLERS.values()}
ALIASES |= {"eulera": "euler-a", "euler-ancestral": "euler-a", "plms": "pndm", "dpmpp-2m": "dpm++2m",
            "dpmpp-2m-karras": "dpm++2m-karras", "dpmpp-sde-karras": "dpm++sde-karras", "uni-pc": "unipc"}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by t2i name or A1111 display name (case and spaces ignored)."""
    found = ALIASES.get(_key(name))
    if found is None:
        hint = did_you_mean(_key(name), ALIASES)
        raise UsageError(f"unknown sampler {name!r}{f' ({hint})' if hint else ''}; valid: {', '.join(SAMPLERS)} "
                         "(or A1111 names, see `t2i samplers`)")
    return SAMPLERS[found]


def make_scheduler(name: str, base_config: dict[str, Any], seed: int | None = None):
    """A fresh scheduler for `name`, keeping the model's noise schedule from `base_config`.

    `seed` seeds samplers with their own noise source (DPM++ SDE's Brownian tree),
    which would otherwise draw a random seed and never reproduce.
    """
    sampler = get_sampler(name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    # Another sampler's switches must not leak into this one (e.g. Karras sigmas into plain DPM++ 2M).
    for key in ("use_karras_sigmas", "algorithm_type", "use_exponential_sigmas", "use_beta_sigmas"):
        config.pop(key, None)
    accepted = inspect.signature(sampler.scheduler.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}  # no "ignored attributes" chatter
    if "noise_sampler_seed" in accepted and seed is not None:
        config["noise_sampler_seed"] = seed % 2**63
    return sampler.scheduler.from_config(config, **sampler.options)
