"""Samplers and schedules apart, as A1111 1.9+ has them; what t2i writes is read back by A1111 as what ran.

`A1111` below re-implements the behaviour of A1111's `parse_generation_parameters` (infotext_utils.py)
and `get_sampler_and_scheduler` (sd_samplers.py), with its 1.9+ registry facts (sd_schedulers.py, the
per-sampler default schedules of sd_samplers_kdiffusion.py): written from their behaviour, not their code,
and independent of t2i's own reader (t2i.infotext), which is checked against it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from helpers import pixels
from t2i import infotext, metadata
from t2i.errors import UsageError
from t2i.samplers import SAMPLERS, SCHEDULES, get_schedule, make_scheduler, resolve
from t2i.settings import Settings


class A1111:
    """What AUTOMATIC1111 1.9+ does with an infotext it is given (paste / send to txt2img)."""

    # (key, label, aliases) of sd_schedulers.schedulers, in its order; the first is the fallback
    SCHEDULERS = [("automatic", "Automatic", []), ("uniform", "Uniform", []), ("karras", "Karras", []),
                  ("exponential", "Exponential", []), ("polyexponential", "Polyexponential", []),
                  ("sgm_uniform", "SGM Uniform", ["SGMUniform"]), ("kl_optimal", "KL Optimal", []),
                  ("align_your_steps", "Align Your Steps", []), ("simple", "Simple", []), ("normal", "Normal", []),
                  ("ddim", "DDIM", []), ("beta", "Beta", [])]
    # sampler -> the 'scheduler' option of its k-diffusion entry (its Automatic); None: the model's own sigmas
    SAMPLERS = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
                "Euler a": None, "Euler": None, "LMS": None, "Heun": None, "DPM2": "karras", "DPM2 a": "karras",
                "DPM fast": None, "DPM adaptive": None, "Restart": "karras", "LCM": None,
                "DDIM": None, "DDIM CFG++": None, "PLMS": None, "UniPC": None}
    OWN_STEPS = {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}  # timestep samplers: no schedule type is used
    LCM_OWN = {"LCM"}  # t2i runs diffusers' LCM schedule; compared by name only
    PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    SIZE = re.compile(r"^(\d+)x(\d+)$")

    @classmethod
    def parse(cls, text: str) -> dict:
        res, prompt, negative, in_negative = {}, "", "", False
        *lines, last = text.strip().split("\n")
        if len(cls.PARAM.findall(last)) < 3:
            lines.append(last)
            last = ""
        for line in lines:
            line = line.strip()
            if line.startswith("Negative prompt:"):
                in_negative, line = True, line[16:].strip()
            if in_negative:
                negative += ("" if negative == "" else "\n") + line
            else:
                prompt += ("" if prompt == "" else "\n") + line
        res["Prompt"], res["Negative prompt"] = prompt, negative
        for k, v in cls.PARAM.findall(last):
            if v[:1] == '"' and v[-1:] == '"':
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            m = cls.SIZE.match(v)
            if m:
                res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
            else:
                res[k] = v
        res.setdefault("Schedule type", "Automatic")  # a missing one means Automatic
        return res

    @classmethod
    def sampler_and_scheduler(cls, sampler_name: str | None, scheduler_name: str | None) -> tuple[str, str]:
        by_name = {k: (k, label, al) for k, label, al in cls.SCHEDULERS} | \
                  {label: (k, label, al) for k, label, al in cls.SCHEDULERS}
        found = by_name.get(scheduler_name, cls.SCHEDULERS[0])
        name = sampler_name or "DPM++ 2M"
        for sched in cls.SCHEDULERS:
            for option in [sched[1], sched[0], *sched[2]]:
                if name.endswith(" " + option):  # an old combined name: the schedule in it wins
                    found, name = sched, name[: -(len(option) + 1)]
                    break
        sampler = name if name in cls.SAMPLERS else "DPM++ 2M"
        if cls.SAMPLERS[sampler] == found[0]:
            found = cls.SCHEDULERS[0]  # the sampler's default schedule reads as Automatic
        return sampler, found[1]

    @classmethod
    def runs(cls, text: str) -> tuple[str, str]:
        """(sampler, schedule key) A1111 samples with after pasting `text`."""
        res = cls.parse(text)
        sampler, label = cls.sampler_and_scheduler(res.get("Sampler"), res.get("Schedule type"))
        if sampler in cls.OWN_STEPS or sampler in cls.LCM_OWN:
            return sampler, "own"
        key = next(k for k, lab, _ in cls.SCHEDULERS if lab == label)
        return sampler, key if key != "automatic" else (cls.SAMPLERS[sampler] or "uniform")


def _offered():
    """Every (sampler, schedule) t2i offers: A1111 schedules each sampler can run, plus automatic."""
    for name, s in SAMPLERS.items():
        for key in ("automatic", *s.schedules):
            if key == "automatic" or SCHEDULES[key].a1111:
                yield name, key


@pytest.mark.parametrize("sampler,schedule", list(_offered()))
def test_a1111_reads_back_the_sampler_and_schedule_that_ran(sampler, schedule):
    ran = resolve(sampler, schedule)  # what t2i runs and records
    text = metadata.a1111_parameters(Settings(prompt="a, b", steps=20, sampler=ran[0], scheduler=ran[1], seed=3,
                                              guidance=7))
    a1111_sampler, a1111_schedule = A1111.runs(text)
    assert a1111_sampler == SAMPLERS[ran[0]].a1111
    if SAMPLERS[ran[0]].automatic == "automatic":  # runs on its own steps: A1111 uses no schedule for it either
        assert a1111_schedule == "own" and "Schedule type" not in text
    else:
        assert a1111_schedule == ran[1], text
    if schedule == "automatic":
        assert ran[1] == SAMPLERS[sampler].automatic  # A1111 1.9+'s automatic, resolved and written out
    # and t2i's own reader (send to txt2img) agrees with A1111's
    fields = metadata.parse_a1111(text)
    assert infotext.a1111_sampler(fields["Sampler"], fields.get("Schedule type")) == ran


def test_plain_dpm2m_is_never_written_so_that_a1111_reads_karras():
    """The issue's case: a DPM++ 2M on a uniform schedule must not read as DPM++ 2M Karras in A1111 1.9+."""
    for sampler in ("dpm++2m", "dpm2", "dpm2-a"):
        name, key = resolve(sampler, "uniform")
        text = metadata.a1111_parameters(Settings(prompt="x", sampler=name, scheduler=key))
        assert A1111.runs(text) == (SAMPLERS[name].a1111, "uniform")
        assert A1111.runs(text.replace(", Schedule type: Uniform", "")) == (SAMPLERS[name].a1111, "karras")


@pytest.mark.parametrize("sampler,schedule_type", [
    ("DPM++ 2M Karras", None), ("DPM++ 2M", None), ("DPM++ 2M", "Karras"), ("DPM++ 2M", "Exponential"),
    ("DPM++ 2M Karras", "Exponential"),  # the name's schedule wins in A1111
    ("Euler a", None), ("Euler", "SGM Uniform"), ("Euler", "SGMUniform"), ("Euler", "sgm_uniform"),
    ("DPM2 a Karras", None), ("DPM2", None), ("DPM++ SDE Karras", None), ("DPM++ 2M SDE", None),
    ("DPM++ 2M SDE Karras", None), ("DPM++ 2M SDE", "Beta"), ("Heun", "Normal"), ("LMS Karras", None),
    ("DDIM", None), ("UniPC", None), ("Euler", "Made Up"),  # a Schedule type A1111 does not know: Automatic
])
def test_t2i_reads_a1111_infotexts_as_a1111_does(sampler, schedule_type):
    text = f"x\nSteps: 20, Sampler: {sampler}, " + (f"Schedule type: {schedule_type}, " if schedule_type else "") + \
           "CFG scale: 7, Seed: 1, Size: 64x64"
    fields = metadata.parse_a1111(text)
    name, key = infotext.a1111_sampler(fields["Sampler"], fields.get("Schedule type"))
    a_sampler, a_key = A1111.runs(text)
    assert SAMPLERS[name].a1111 == a_sampler
    assert key == ("automatic" if a_key == "own" else a_key)


def test_old_names_and_a1111_names_resolve():
    assert resolve("dpm++2m-karras") == resolve("DPM++ 2M Karras") == resolve("DPM++ 2M") == ("dpm++2m", "karras")
    assert resolve("dpm++2m-karras", "automatic") == resolve("dpm++2m", "Karras") == ("dpm++2m", "karras")
    assert resolve("dpm++sde-karras") == ("dpm++sde", "karras")
    assert resolve("dpm++2m-sde-karras") == ("dpm++2m-sde", "karras")
    assert resolve("dpm2-karras") == ("dpm2", "karras")
    assert resolve("DPM++ 2M SDE") == ("dpm++2m-sde", "exponential")
    assert resolve("euler") == resolve("Euler", "Automatic") == ("euler", "uniform")
    assert resolve("ddim") == ("ddim", "automatic")
    assert get_schedule("SGM Uniform").name == get_schedule("sgm_uniform").name == "sgm_uniform"


@pytest.mark.parametrize("sampler,schedule,words", [
    ("euler-a", "karras", ["Euler a", "uniform"]),  # diffusers' Euler a has no sigma schedules
    ("ddim", "karras", ["own steps"]),
    ("euler", "align_your_steps", ["Align Your Steps", "no exact diffusers"]),
    ("Euler Simple", None, ["Simple"]),
    ("euler", "karas", ["did you mean 'karras'"]),
    ("dpm++2m-karras", "exponential", ["already says", "DPM++ 2M"]),
    ("dpm++9m", None, ["unknown sampler"]),
])
def test_bad_schedules_are_one_line_errors(sampler, schedule, words):
    with pytest.raises(UsageError) as e:
        resolve(sampler, schedule)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_records_from_before_schedules_resolve_to_what_they_ran():
    """No `scheduler` in the JSON: a combined name says it; a plain one ran on the model's own spacing."""
    assert resolve("dpm++2m-karras", "", {"timestep_spacing": "leading"}) == ("dpm++2m", "karras")
    assert resolve("dpm++2m", "", {"timestep_spacing": "linspace"}) == ("dpm++2m", "uniform")
    assert resolve("euler", "", {"timestep_spacing": "leading"}) == ("euler", "leading")
    assert resolve("euler", "", {"timestep_spacing": "trailing"}) == ("euler", "sgm_uniform")
    assert resolve("ddim", "", {"timestep_spacing": "leading"}) == ("ddim", "automatic")
    assert Settings.from_dict({"prompt": "x", "sampler": "dpm++2m-karras"}).scheduler == ""
    old = metadata.a1111_parameters(Settings(prompt="x", sampler="dpm++2m-karras"))
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in old
    # a plain DPM++ 2M on a "leading" config: A1111's closest schedule (DDIM), never its automatic Karras
    leading = metadata.a1111_parameters(Settings(prompt="x", sampler="dpm++2m", scheduler="leading"))
    assert A1111.runs(leading) == ("DPM++ 2M", "ddim")
    with pytest.raises(UsageError, match="DDIM schedule has no exact"):
        resolve("euler", "DDIM")  # not offered: exact only for some step counts


def test_each_schedule_sets_its_one_switch_and_no_other():
    base = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
            "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1}  # like a model's config
    for key in ("uniform", "karras", "exponential", "sgm_uniform", "normal", "beta"):
        config = make_scheduler("dpm++2m", base, schedule=key).config
        assert config.use_karras_sigmas is (key == "karras")
        assert config.use_exponential_sigmas is (key == "exponential")
        assert config.use_beta_sigmas is (key == "beta")
        spacing = {"uniform": "linspace", "normal": "linspace", "sgm_uniform": "trailing"}.get(key, "leading")
        assert config.timestep_spacing == spacing
    euler = make_scheduler("euler", base)  # automatic: Uniform, the model's Karras switch left behind
    assert not euler.config.use_karras_sigmas and euler.config.timestep_spacing == "linspace"


# --------------------------------------------------------------------------- on a tiny model


def _run_all(sd_pipe, combos, steps=2):
    seen = {}
    for sampler, schedule in combos:
        result = sd_pipe("a green triangle", steps=steps, seed=2, sampler=sampler, scheduler=schedule, progress=False)
        s = result.settings[0]
        assert (s.sampler, s.scheduler) == resolve(sampler, schedule)
        image = pixels(result.images[0])
        assert image.std() > 0
        seen[(s.sampler, s.scheduler)] = image
    return seen


def test_each_schedule_runs_and_changes_the_images(sd_pipe):
    # 4 steps: at 2, every sigma schedule is just its two ends
    seen = _run_all(sd_pipe, [("euler", k) for k in SAMPLERS["euler"].schedules], steps=4)
    keys = [k for k in seen if k[1] != "normal"]
    assert all(not np.array_equal(seen[a], seen[b]) for i, a in enumerate(keys) for b in keys[i + 1:])
    assert np.array_equal(seen[("euler", "uniform")], seen[("euler", "normal")])  # A1111's Normal is Uniform


@pytest.mark.slow
def test_every_sampler_runs_on_every_schedule_it_offers(sd_pipe):
    _run_all(sd_pipe, _offered())


def test_old_names_make_the_same_pixels_as_the_split_ones(sd_pipe, monkeypatch):
    run = lambda **kw: pixels(sd_pipe("a", steps=3, seed=1, progress=False, **kw).images[0])  # noqa: E731
    default = run()
    assert np.array_equal(default, run(sampler="dpm++2m-karras"))
    assert np.array_equal(default, run(sampler="DPM++ 2M", scheduler="Karras"))
    assert not np.array_equal(default, run(sampler="dpm++2m", scheduler="uniform"))
    # a record from before schedules ("" schedule, plain name) runs on the model's own spacing
    legacy = sd_pipe("a", steps=3, seed=1, sampler="euler", scheduler="", progress=False)
    assert legacy.settings[0].scheduler == "uniform"  # the tiny model's config spaces linearly
    monkeypatch.setitem(sd_pipe._scheduler_config, "timestep_spacing", "leading")  # as SD 1.x configs do
    legacy = sd_pipe("a", steps=3, seed=1, sampler="euler", scheduler="", progress=False)
    assert legacy.settings[0].scheduler == "leading"
    assert np.array_equal(pixels(legacy.images[0]), run(sampler="euler", scheduler="leading"))


@pytest.mark.parametrize("old_sampler,runs_as", [("dpm++2m-karras", ["--sampler", "DPM++ 2M", "--scheduler", "karras"]),
                                                 ("euler", ["--sampler", "euler", "--scheduler", "uniform"])])
def test_pngs_from_before_schedules_reproduce_bit_for_bit(run_cli, tiny_sd, tmp_path, old_sampler, runs_as):
    """A PNG whose t2i JSON has no `scheduler` and an old sampler name (as t2i wrote them) replays exactly."""
    from PIL import Image

    made = tmp_path / "made.png"
    code, _, err = run_cli("generate", "a blue star", "--model", tiny_sd, "--steps", 3, "--seed", 4, *runs_as,
                           "--out", made, "-q")
    assert code == 0, err
    _, settings = metadata.read(made)
    old = {k: v for k, v in settings.to_dict().items() if k != "scheduler"} | {"sampler": old_sampler}
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a blue star\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 4, Size: 32x32")
    info.add_text("t2i", json.dumps(old))
    legacy = tmp_path / "legacy.png"
    with Image.open(made) as im:
        im.save(legacy, pnginfo=info)
    assert metadata.read(legacy)[1].scheduler == ""
    code, stdout, err = run_cli("reproduce", legacy, "-q")
    assert code == 0 and "bit for bit" in stdout, (stdout, err)
