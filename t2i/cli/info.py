"""`t2i info`: the generation settings stored in a PNG."""

from __future__ import annotations

import json

from t2i.errors import UsageError


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="print the generation settings stored in a PNG")
    i.add_argument("image")
    i.add_argument("--json", action="store_true", help="print t2i's JSON settings instead of A1111's text")
    i.set_defaults(func=cmd_info)



def cmd_info(args) -> int:
    from t2i import metadata  # deferred: PIL; --help must not import it

    text, settings = metadata.read(args.image)
    if text is None and settings is None:
        raise UsageError(f"{args.image} carries no generation metadata")
    if args.json:
        if settings is None:
            raise UsageError(f"{args.image} has A1111 parameters but no t2i JSON settings; drop --json")
        print(json.dumps(settings.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(text if text is not None else json.dumps(settings.to_dict(), indent=2, ensure_ascii=False))
    return 0
