"""`t2i reproduce`: make a PNG again from its metadata and compare bit for bit."""

from __future__ import annotations

import contextlib

from t2i.choices import DEVICES, DTYPES
from t2i.cli.common import tidy_folders


def add_parser(sub) -> None:
    r = sub.add_parser("reproduce", help="regenerate a PNG from its metadata and compare bit for bit",
                       description="Regenerate an image from the settings in its metadata. Exit code 0 when the "
                                   "new image matches bit for bit, 1 when it differs.")
    r.add_argument("image")
    r.add_argument("--model", "-m", metavar="PATH|ID", help="use this model instead of the one recorded")
    r.add_argument("--model-config", metavar="DIR", help="configs for a single-file model (default: as recorded)")
    r.add_argument("--device", default=None, choices=DEVICES, help="default: as recorded")
    r.add_argument("--dtype", default=None, choices=DTYPES, help="default: as recorded")
    r.add_argument("--allow-pickle", action="store_true", help="allow pickle-based weights (trusted files only)")
    r.add_argument("--init", metavar="IMAGE", help="img2img/inpaint: the init image, if it moved from the recorded path")
    r.add_argument("--mask", metavar="IMAGE", help="inpaint: the mask, if it moved from the recorded path")
    r.add_argument("--vae", metavar="PATH", help="the VAE the image was made with, if it moved from the recorded path")
    r.add_argument("--out", "-o", metavar="PNG", help="also save the regenerated image here")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reproduce)



def cmd_reproduce(args) -> int:
    from t2i.reproduce import reproduce  # deferred: torch and diffusers; --help must not import them

    with tidy_folders(args.out) if args.out else contextlib.nullcontext():  # no new empty folder left behind
        report = reproduce(args.image, model=args.model, device=args.device, dtype=args.dtype,
                           allow_pickle=args.allow_pickle, out=args.out, overwrite=args.overwrite,
                           progress=not args.quiet, model_config=args.model_config, init=args.init, mask=args.mask,
                           vae=args.vae)
    print(report.summary())
    return 0 if report.identical else 1
