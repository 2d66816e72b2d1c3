"""Whole-process time of one `t2i generate` against the same job written with stock diffusers.

    python -m t2i.bench.startup --repeats 5 [--model PATH] [--prompt TEXT] [-- extra t2i generate arguments]

Each round runs both, in turn, as fresh processes (imports, loading, sampling, decoding, writing the PNG):
`t2i generate PROMPT --seed 1 --out A.png` and a script that loads the same model folder with
`StableDiffusionPipeline.from_pretrained`, runs the model's steps, guidance and sampler at its size and
saves the PNG. Prints the median of each and their ratio (t2i / stock), in wall seconds and in CPU seconds
(user + system of the process and its threads: on a shared machine the wall time grows with the other jobs'
load, the CPU time much less). The first round warms the file cache and is not counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOCK = r'''
import json, sys, torch
from pathlib import Path
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
model, out, prompt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
d = json.loads((model / "t2i.json").read_text()) if (model / "t2i.json").is_file() else {}
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=d.get("steps", 20), guidance_scale=d.get("guidance", 7.0),
             generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(out)
'''


def _time(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of cmd."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "assets" / "t2i-shapes"))
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("extra", nargs="*", help="more `t2i generate` arguments (after --)")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"t2i": [], "stock": []}
    cpu: dict[str, list[float]] = {"t2i": [], "stock": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats + 1):
            t2i = _time([sys.executable, "-m", "t2i.cli", "generate", args.prompt, "--model", args.model, "--seed",
                         "1", "--out", f"{tmp}/t2i-{round_}.png", "-q", *args.extra])
            stock = _time([sys.executable, "-c", STOCK, args.model, f"{tmp}/stock-{round_}.png", args.prompt])
            if round_:
                for name, (wall, used) in (("t2i", t2i), ("stock", stock)):
                    times[name].append(round(wall, 3))
                    cpu[name].append(round(used, 3))
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(json.dumps({"median_s": med, "ratio": med["t2i"] / med["stock"], "median_cpu_s": med_cpu,
                      "cpu_ratio": med_cpu["t2i"] / med_cpu["stock"], "runs_s": times, "runs_cpu_s": cpu}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
