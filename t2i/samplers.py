"""Samplers and schedules by name: plain registries over diffusers schedulers.

A sampler (the solver: Euler, DPM++ 2M, ...) and a schedule (where its steps fall: Karras,
Exponential, Uniform, ...) are two names, as in AUTOMATIC1111 1.9+ (`Sampler: DPM++ 2M,
Schedule type: Karras`). Each sampler names a diffusers scheduler class (imported when first
used, so that reading metadata never imports diffusers); each schedule is the one diffusers
switch that makes its steps. `automatic` is the schedule A1111 1.9+ gives the sampler
(Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, Uniform for Euler), and what is recorded
is always the schedule that ran. The old combined names ("dpm++2m-karras", "DPM++ 2M Karras")
still work: `resolve` splits them. Swapping is changing one name:
`make_scheduler("dpm++2m", base_config, schedule="karras")`.
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
class Schedule:
    name: str  # A1111's key, e.g. "sgm_uniform"
    label: str  # A1111's label, what `Schedule type:` says, e.g. "SGM Uniform"
    options: dict[str, Any] = field(default_factory=dict)  # the diffusers switch that makes it
    a1111: bool = True  # False: t2i's own (A1111 has no such schedule)


SCHEDULES: dict[str, Schedule] = {
    s.name: s
    for s in [
        Schedule("automatic", "Automatic"),  # the sampler's own; resolved before anything runs
        # k-diffusion's default discretisation: timesteps evenly from the last training step to 0
        Schedule("uniform", "Uniform", {"timestep_spacing": "linspace"}),
        Schedule("karras", "Karras", {"use_karras_sigmas": True}),
        Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
        Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}),
        Schedule("normal", "Normal", {"timestep_spacing": "linspace"}),  # A1111's "Normal" is Uniform's formula
        Schedule("beta", "Beta", {"use_beta_sigmas": True}),  # alpha = beta = 0.6, A1111's defaults
        # diffusers' "leading" spacing (SD 1.x/2.x configs): only for replaying images t2i made before it had
        # schedules with a plain sampler name on such a model; not offered. Written as A1111's DDIM schedule,
        # the closest it has (the same timesteps on a steps_offset=1 config when the steps divide 1000).
        Schedule("leading", "DDIM", {"timestep_spacing": "leading"}, a1111=False),
    ]
}
# A1111 schedules diffusers cannot make exactly: refused by name rather than approximated.
UNSUPPORTED_SCHEDULES = {"polyexponential": "Polyexponential", "kl_optimal": "KL Optimal",
                         "align_your_steps": "Align Your Steps", "simple": "Simple", "ddim": "DDIM",
                         "karras_exponential": "Karras Exponential"}
# The diffusers switches a schedule may set: cleared from the model's config first, so that one schedule's
# switch never leaks into another (e.g. the model's Karras sigmas into a Uniform run).
_SWITCHES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_K = ("uniform", "karras", "exponential", "sgm_uniform", "normal", "beta", "leading")


@dataclass(frozen=True)
class Sampler:
    name: str  # t2i's name, e.g. "dpm++2m"
    a1111: str  # A1111's name, e.g. "DPM++ 2M"
    scheduler_class: str  # a diffusers scheduler, imported on first use
    options: dict[str, Any] = field(default_factory=dict)
    # Draws fresh noise each step from the per-image generators (k-diffusion "ancestral"/SDE).
    stochastic: bool = False
    # One noise source for the whole batch: a batch differs from single runs unless split.
    batch_coupled: bool = False
    # What `automatic` is for this sampler in A1111 1.9+ ("automatic": the sampler keeps its own steps, as
    # A1111's DDIM, PLMS, UniPC and LCM do: they take no schedule type).
    automatic: str = "uniform"
    schedules: tuple[str, ...] = _K  # the schedules diffusers can run it with

    @property
    def scheduler(self) -> type:
        import diffusers  # deferred: reading a PNG's metadata (`t2i info`) checks sampler names without diffusers

        return getattr(diffusers, self.scheduler_class)


_OWN = {"automatic": "automatic", "schedules": ("automatic",)}
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("euler", "Euler", "EulerDiscreteScheduler"),
        Sampler("euler-a", "Euler a", "EulerAncestralDiscreteScheduler", stochastic=True,
                schedules=("uniform", "sgm_uniform", "normal", "leading")),  # diffusers: no sigma schedules
        Sampler("heun", "Heun", "HeunDiscreteScheduler"),
        Sampler("lms", "LMS", "LMSDiscreteScheduler"),
        Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler", automatic="karras"),
        Sampler("dpm2-a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True, automatic="karras"),
        Sampler("dpm++2m", "DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"},
                automatic="karras"),
        Sampler("dpm++2m-sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++"}, stochastic=True, automatic="exponential"),
        Sampler("dpm++sde", "DPM++ SDE", "DPMSolverSDEScheduler", stochastic=True, batch_coupled=True,
                automatic="karras"),
        Sampler("ddim", "DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, **_OWN),
        Sampler("pndm", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}, **_OWN),
        Sampler("unipc", "UniPC", "UniPCMultistepScheduler", **_OWN),
        Sampler("lcm", "LCM", "LCMScheduler", **_OWN),
    ]
}
DEFAULT_SAMPLER = "dpm++2m"  # with its automatic schedule, Karras: "DPM++ 2M Karras"
DEFAULT_SCHEDULE = "automatic"
# t2i's names from before schedules were apart: each is a sampler plus a schedule.
COMBINED: dict[str, tuple[str, str]] = {"dpm2-karras": ("dpm2", "karras"), "dpm++2m-karras": ("dpm++2m", "karras"),
                                        "dpm++2m-sde-karras": ("dpm++2m-sde", "karras"),
                                        "dpm++sde-karras": ("dpm++sde", "karras")}


def _key(name: str) -> str:
    return "".join(name.lower().split()).replace("_", "-")


def _skey(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


# A1111 display names and a few spellings people type, all folded by _key.
ALIASES: dict[str, str] = {_key(s.a1111): s.name for s in SAMPLERS.values()}
ALIASES |= {_key(s.name): s.name for s in SAMPLERS.values()}
ALIASES |= {"eulera": "euler-a", "euler-ancestral": "euler-a", "plms": "pndm", "dpmpp-2m": "dpm++2m",
            "dpmpp-sde": "dpm++sde", "dpmpp-2m-sde": "dpm++2m-sde", "uni-pc": "unipc", "dpm2a": "dpm2-a"}
# Schedules by key or label, case, spaces and underscores ignored ("SGM Uniform" = "sgm_uniform" = "sgmuniform").
SCHEDULE_ALIASES: dict[str, str] = {_skey(k): k for k in SCHEDULES} | {_skey(s.label): k for k, s in SCHEDULES.items()
                                                                      if s.a1111}
SCHEDULE_ALIASES |= {"sgmuniform": "sgm_uniform"}  # A1111's alias "SGMUniform"
_REFUSED_ALIASES = {_skey(k): k for k in UNSUPPORTED_SCHEDULES} | {_skey(v): k for k, v in UNSUPPORTED_SCHEDULES.items()}


def _offered() -> str:
    return ", ".join(k for k, s in SCHEDULES.items() if s.a1111)


def get_schedule(name: str) -> Schedule:
    """A schedule by A1111 key or label (case, spaces, underscores ignored); A1111's others refused in one line."""
    key = _skey(name)
    if key in SCHEDULE_ALIASES:
        return SCHEDULES[SCHEDULE_ALIASES[key]]
    if key in _REFUSED_ALIASES:
        label = UNSUPPORTED_SCHEDULES[_REFUSED_ALIASES[key]]
        raise UsageError(f"the {label} schedule has no exact diffusers equivalent, so t2i does not run it; "
                         f"use one of: {_offered()}")
    hint = did_you_mean(name.lower().replace(" ", "_"), list(SCHEDULES))
    raise UsageError(f"unknown schedule {name!r}{f' ({hint})' if hint else ''}; valid: {_offered()}")


def _split(name: str) -> tuple[str, str | None] | None:
    """A sampler name, with a schedule named at its end as A1111 allows ("DPM++ 2M Karras") -> (t2i sampler,
    schedule key or None); None if it names no sampler."""
    key = _key(name)
    if key in ALIASES:
        return ALIASES[key], None
    if key in COMBINED:
        return COMBINED[key]
    labels = {k: s.label if s.a1111 else k for k, s in SCHEDULES.items()} | UNSUPPORTED_SCHEDULES
    for schedule, label in labels.items():
        for form in {_skey(schedule), _key(schedule), _skey(label), _key(label)}:
            head = key[: -len(form)].rstrip("-") if key.endswith(form) else ""
            if head in ALIASES:
                return ALIASES[head], schedule
    return None


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by t2i name or A1111 name (case and spaces ignored); a schedule at the end of the name
    ("DPM++ 2M Karras", "dpm++2m-karras") is allowed and ignored here (see `resolve`)."""
    found = _split(name)
    if found is None:
        hint = did_you_mean(_key(name), ALIASES)
        raise UsageError(f"unknown sampler {name!r}{f' ({hint})' if hint else ''}; valid: {', '.join(SAMPLERS)} "
                         "(or A1111 names, see `t2i samplers`)")
    return SAMPLERS[found[0]]


# The model's own spacing, as the schedule it is: what a plain sampler name ran with before t2i had schedules.
_SPACING = {"linspace": "uniform", "trailing": "sgm_uniform", "leading": "leading"}


def resolve(sampler: str, schedule: str | None = None, model_config: dict | None = None) -> tuple[str, str]:
    """(t2i sampler name, schedule key) that will run: the one recorded in the image's metadata.

    `schedule` None or "automatic": A1111 1.9+'s choice for the sampler. A schedule at the end of the sampler's
    name ("DPM++ 2M Karras") counts as given. "" is the record of an image made before t2i had schedules: a plain
    sampler name then ran on the model's own timestep spacing (`model_config`, the model's scheduler config).
    """
    found = _split(sampler)
    if found is None:
        get_sampler(sampler)  # raises the one-line error
    name, in_name = found
    s = SAMPLERS[name]
    asked = None if schedule is None or schedule == "" else get_schedule(schedule).name
    if in_name is not None:
        if in_name in UNSUPPORTED_SCHEDULES:
            get_schedule(in_name)  # raises
        if asked not in (None, "automatic", in_name):
            raise UsageError(f"the sampler {sampler!r} already says the {SCHEDULES[in_name].label} schedule; "
                             f"give the plain sampler {s.a1111!r} with the schedule {SCHEDULES[asked].label!r}")
        asked = in_name
    if asked is None and schedule == "" and s.automatic != "automatic":  # an image from before schedules
        if model_config is None:
            return name, ""  # decided once the model's config is known
        asked = _SPACING.get(model_config.get("timestep_spacing", "linspace"))
        if asked is None:
            raise UsageError(f"the model's timestep spacing {model_config.get('timestep_spacing')!r} is none of "
                             f"{', '.join(_SPACING)}; give a schedule (--scheduler)")
    if asked in (None, "automatic"):
        asked = s.automatic
    if asked not in s.schedules:
        if s.schedules == ("automatic",):
            raise UsageError(f"{s.a1111} runs on its own steps, as in A1111 (it takes no schedule type); "
                             "leave the schedule automatic")
        offered = [k for k in s.schedules if SCHEDULES[k].a1111]
        raise UsageError(f"{s.a1111} cannot run the {SCHEDULES[asked].label} schedule in diffusers; "
                         f"use one of: {', '.join(offered)}")
    return name, asked


def a1111_names(sampler: str, schedule: str) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 1.9+ writes them for what ran; Schedule type None where A1111 writes
    none (samplers on their own steps). Images from before schedules ("" schedule, plain name) say the sampler
    alone, as t2i wrote them then."""
    found = _split(sampler)
    if found is None:
        return sampler, None
    name, in_name = found
    key = schedule or in_name
    if key is None or key == "automatic" or key not in SCHEDULES:
        return SAMPLERS[name].a1111, None
    return SAMPLERS[name].a1111, SCHEDULES[key].label


def make_scheduler(name: str, base_config: dict[str, Any], seed: int | None = None, schedule: str | None = None):
    """A fresh scheduler for sampler `name` on `schedule` (see `resolve`), keeping the model's noise schedule
    from `base_config`.

    `seed` seeds samplers with their own noise source (DPM++ SDE's Brownian tree),
    which would otherwise draw a random seed and never reproduce.
    """
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    name, key = resolve(name, schedule, config)
    sampler = SAMPLERS[name]
    # Another sampler's switches must not leak into this one (e.g. Karras sigmas into plain DPM++ 2M).
    for k in ("algorithm_type", *_SWITCHES):
        config.pop(k, None)
    accepted = inspect.signature(sampler.scheduler.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}  # no "ignored attributes" chatter
    if "noise_sampler_seed" in accepted and seed is not None:
        config["noise_sampler_seed"] = seed % 2**63
    return sampler.scheduler.from_config(config, **sampler.options, **SCHEDULES[key].options)
