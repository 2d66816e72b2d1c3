"""`t2i info`: the generation settings stored in an image (t2i's, A1111's, ComfyUI's)."""

from __future__ import annotations

import json

from t2i.errors import UsageError


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="print the generation settings stored in an image",
                       description="Print how an image was made: t2i's and A1111's parameters (PNG text, or A1111's "
                                   "EXIF UserComment in a JPEG or WebP), or a summary of a ComfyUI workflow (its "
                                   "KSampler's sampler, scheduler, seed, steps, CFG, prompts, size and checkpoint).")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print t2i's JSON settings instead of A1111's text")
    i.set_defaults(func=cmd_info)



def cmd_info(args) -> int:
    from t2i import infotext  # deferred: PIL; --help must not import it

    found = infotext.read(args.image)
    if found is None:
        raise UsageError(f"{args.image} carries no generation metadata")
    if args.json:
        if found.settings is None:
            raise UsageError(f"{args.image} has {'A1111' if found.source == 'a1111' else 'ComfyUI'} parameters but "
                             "no t2i JSON settings; drop --json")
        print(json.dumps(found.settings.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(found.text)
    return 0
