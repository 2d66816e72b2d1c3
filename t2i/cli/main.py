"""The `t2i` command: a thin shell over the Python API.

Every subcommand checks its arguments before loading a model, prints written
paths on stdout and progress and notices on stderr, and turns a `T2IError` into one
line `t2i: error: ...` with exit code 2 (no traceback; `--debug` or T2I_DEBUG=1 shows it).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback

from t2i import __version__
from t2i.errors import T2IError
from t2i.cli import bench, eval, generate, grid, guide, info, lora, reproduce, samplers, serve, train
from t2i.log import notices_on_stderr
from t2i.cli.common import EXAMPLES, Parser
from t2i.cli.startup import defer_import, no_collections


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="t2i",
        description="Text-to-image diffusion: generate images, fine-tune LoRAs, evaluate and benchmark models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"t2i {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback behind an error (also T2I_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    for command in (generate, grid, samplers, info, reproduce, eval, bench, train, lora, guide, serve):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    with no_collections():
        parser = build_parser()
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("T2I_DEBUG", "").lower() not in ("", "0", "false", "no")
    with notices_on_stderr():
        try:
            return int(args.func(args) or 0)
        except T2IError as e:
            if debug:
                traceback.print_exc()
            print(f"t2i: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print("t2i: interrupted", file=sys.stderr)
            return 130


def run() -> None:
    """The `t2i` process (the console script, `python -m t2i.cli`): main() with two start-up savings
    that change process-wide state, so they are not main()'s to make for in-process callers."""
    defer_import("scipy.stats")
    code = main()
    gc.freeze()  # exit skips a last full collection over everything imported and loaded (1 s)
    sys.exit(code)


