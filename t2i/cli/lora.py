"""`t2i lora convert|info`: LoRA files between the diffusers and kohya layouts, and what one holds."""

from __future__ import annotations

import argparse

from t2i.cli.common import Parser


def add_parser(sub) -> None:
    lo = sub.add_parser("lora", help="LoRA files: convert between the diffusers and kohya layouts, show info")
    lsub = lo.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser)
    c = lsub.add_parser(
        "convert", help="rewrite a LoRA in the diffusers or kohya/A1111 key layout (metadata kept)",
        description="Convert a LoRA file between diffusers' layout (what pipe.load_lora_weights reads) and "
                    "kohya's (what A1111/ComfyUI/kohya tools read). Alpha/rank is folded into the weights, so "
                    "the result gives the same images in any loader.",
        epilog="example:\n  t2i lora convert runs/outline/lora.safetensors outline-kohya.safetensors --format kohya",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("input", metavar="IN", help="a LoRA file, either layout")
    c.add_argument("output", metavar="OUT", help="the .safetensors file to write")
    c.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="layout of OUT")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    c.add_argument("--allow-pickle", action="store_true", help="read a pickle-based IN (.pt/.ckpt; trusted only)")
    c.set_defaults(func=cmd_lora_convert)
    i = lsub.add_parser("info", help="print a LoRA's format, rank, alpha, modules and metadata")
    i.add_argument("file")
    i.add_argument("--allow-pickle", action="store_true", help="read a pickle-based file (trusted only)")
    i.set_defaults(func=cmd_lora_info)
    lo.set_defaults(func=lambda args: lo.print_help() or 2)


def cmd_lora_convert(args) -> int:
    from t2i.lora.format import convert_lora  # deferred: torch; --help must not import it

    print(convert_lora(args.input, args.output, args.format, overwrite=args.overwrite,
                       allow_pickle=args.allow_pickle))
    return 0


def cmd_lora_info(args) -> int:
    from t2i.lora.format import lora_info  # deferred: torch; --help must not import it

    print(lora_info(args.file, allow_pickle=args.allow_pickle).summary())
    return 0
