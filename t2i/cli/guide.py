"""`t2i guide`: give a model folder an autoguidance guide from an earlier checkpoint of its training."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    g = sub.add_parser(
        "guide", help="give a model folder an autoguidance guide: an earlier checkpoint of its own training",
        description="Write DIR/guide/ from an earlier checkpoint of the model's training (the weaker model that "
                    "autoguidance steers away from), stored as its difference from the model's UNet at a few bits "
                    "per weight, and turn autoguidance on in DIR/t2i.json. The guide's path goes to stdout.")
    g.add_argument("--model", required=True, metavar="DIR", help="the model folder (diffusers layout) to give a guide")
    g.add_argument("--from", dest="source", required=True, metavar="CHECKPOINT",
                   help="an earlier checkpoint of the same training: a `t2i train demo` checkpoint folder, a "
                        "diffusers UNet or model folder, or a .safetensors file")
    g.add_argument("--bits", type=int, default=3,
                   help="bits per weight of the difference, 1-8 (default 3); 16 stores the whole UNet in fp16")
    g.add_argument("--scale", type=float, default=3.0, help="the autoguidance scale t2i.json gets (default 3)")
    g.add_argument("--below", type=int, default=500,
                   help="autoguide the steps below this training timestep (default 500); noisier steps keep "
                        "classifier-free guidance")
    g.add_argument("--overwrite", action="store_true", help="replace the model's existing guide/")
    g.set_defaults(func=cmd_guide)


def cmd_guide(args) -> int:
    from t2i.models import guide  # deferred: torch and diffusers; --help must not import them

    model, source = Path(args.model).expanduser(), Path(args.source).expanduser()
    folder, kept = guide.make(model, source, args.bits, args.scale, args.below, args.overwrite)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    stored = "the whole UNet in fp16" if args.bits == guide.FULL else (
        f"{args.bits} bits per weight, {kept:.1%} of the difference's energy kept")
    print(f"t2i: guide {size:.2f} MB ({stored}); {model / 't2i.json'}: autoguidance {args.scale:g} below "
          f"timestep {args.below}", file=sys.stderr)
    print(folder)
    return 0
