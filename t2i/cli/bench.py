"""`t2i bench`: stock diffusers against t2i, plain and with speed options (see t2i.bench)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from t2i.choices import BENCH_ARCHS, BENCH_OPTIONS, BENCH_PROMPT, DEVICES, DTYPES, SPEED_OPTIONS
from t2i.cli.common import positive_int
from t2i.errors import UsageError


def add_parser(sub) -> argparse.ArgumentParser:
    """`t2i bench` on the CLI's subparsers (`sub.add_parser`); sets `func=cmd_bench`."""
    defaults = ",".join(BENCH_OPTIONS)
    b = sub.add_parser("bench", help="time t2i against stock diffusers on the same generation",
                       description="Run one generation through stock diffusers' pipeline call and through t2i "
                                   "(plain, each speed option alone, and all together), alternating, and print "
                                   "medians of step and call times, peak memory and pixel differences.")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--model", "-m", metavar="PATH|ID", help="default: the bundled t2i-shapes")
    which.add_argument("--arch", choices=BENCH_ARCHS,
                       help="a randomly initialised model of this architecture's real size (nothing downloaded)")
    b.add_argument("--steps", type=positive_int, help="default: the model's")
    b.add_argument("--size", type=positive_int, help="image side in pixels (default: the model's)")
    b.add_argument("--batch", type=positive_int, default=1, help="images per call (default 1)")
    b.add_argument("--repeats", type=positive_int, default=3, help="counted rounds of all variants (default 3)")
    b.add_argument("--options", default=defaults,
                   help=f"speed options, each benched alone and all together (default: {defaults}); names: "
                        f"{', '.join(SPEED_OPTIONS)}")
    b.add_argument("--prompt", "-p", default=BENCH_PROMPT, help=f"default: {BENCH_PROMPT!r}")
    b.add_argument("--seed", type=positive_int, default=0, help="default 0")
    b.add_argument("--shapeeval", action="store_true",
                   help="also ShapeEval of each variant (13 prompts x 2 seeds; meaningful for the demo model)")
    b.add_argument("--flops", action="store_true", help="also GFLOP/s of a UNet step and the matmul peak "
                                                        "(on with --arch)")
    b.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--device", default="auto", choices=DEVICES)
    b.add_argument("--dtype", default="auto", choices=DTYPES)
    b.add_argument("--allow-pickle", action="store_true", help=argparse.SUPPRESS)
    b.add_argument("--model-config", metavar="DIR", help=argparse.SUPPRESS)
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args) -> int:
    """`t2i bench`: arguments checked before loading, then the bench, the table, and --json."""
    # deferred: torch and diffusers; --help must not import them
    import torch

    from t2i import guards, models
    from t2i.bench.core import bench, header, table, variants
    from t2i.bench.random_models import random_pipeline
    from t2i.pipelines import Text2Image

    if args.steps is not None:
        guards.check_steps(args.steps)
    guards.check_batch(args.batch)
    guards.check_seed(args.seed)
    if args.size is not None:
        guards.check_size(args.size, args.size)
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    variants(options)  # unknown names fail here, before loading
    if args.json and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file name")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch:
        pipe = random_pipeline(args.arch, args.device, args.dtype, tiny_vae="tiny_vae" in options)
    else:
        models.resolve(args.model)
        pipe = Text2Image.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                          allow_pickle=args.allow_pickle, model_config=args.model_config)
    report = bench(pipe, args.steps, args.size, args.batch, args.repeats, options, args.prompt, args.seed,
                   shapeeval=args.shapeeval, flops=args.flops or bool(args.arch))
    print(header(report.info))
    print(table(report.rows, report.info))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0
