"""`t2i train demo|lora|style-data`: train the demo model, fine-tune a LoRA, write a style dataset."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import tomllib

from t2i.errors import UsageError
from t2i.cli.common import Parser, number, positive_int


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="training: the demo model from scratch, a LoRA, or an embedding")
    tsub = t.add_subparsers(dest="what", metavar="WHAT", parser_class=Parser)
    d = tsub.add_parser("demo", help="train the bundled demo model t2i-shapes from scratch (resumable)")
    d.add_argument("--config", default=None, metavar="TOML",
                   help="training config: a TOML file, or a shipped one by name: demo (the default; from scratch) or "
                        "continue (trains the bundled model further)")
    d.add_argument("--stage", default="all",
                   choices=["tokenizer", "vae", "text", "unet", "decoder", "tiny_vae", "export", "all"],
                   help="default: all (each stage resumes; export writes export_dir from the newest checkpoint)")
    d.add_argument("--resume", default="latest", metavar="latest|PATH|none", help="default: latest")
    d.add_argument("--output-dir", help="overrides output_dir (an export_dir inside it moves along)")
    d.add_argument("--export-dir", help="overrides export_dir")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set unet.steps=6000 (TOML values)")
    d.set_defaults(func=cmd_train_demo)
    _train_lora_parser(tsub)
    _train_embedding_parser(tsub)
    sd = tsub.add_parser("style-data", help="write a style dataset from the shapes world (images + captions)",
                         description="Render shapes-world scenes in a style (e.g. outlines only) with a .txt "
                                     "caption beside each image: ready for `t2i train lora --data`.")
    sd.add_argument("--style", required=True, help="outline | pastel | mosaic | plain (the world as the base model saw it)")
    sd.add_argument("--out", "-o", required=True, metavar="DIR")
    sd.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    sd.add_argument("--seed", type=positive_int, default=0, help="first scene seed (default 0)")
    sd.set_defaults(func=cmd_style_data)
    t.set_defaults(func=lambda args: t.print_help() or 2)


def _config_default(config: type, key: str) -> str:
    """The Python API's default of a training config's key (a dataclass), as help text shows it: one set of
    defaults for the CLI and the API."""
    value = {f.name: f.default for f in dataclasses.fields(config)}[key]
    return f"{value:g}" if isinstance(value, float) else str(value)


def _lora_default(key: str) -> str:
    from t2i.train.lora_config import LoraTrainConfig  # no torch: every t2i command builds this parser

    return _config_default(LoraTrainConfig, key)


def _train_lora_parser(tsub) -> None:
    D = _lora_default
    lo = tsub.add_parser(
        "lora", help="fine-tune a LoRA on a folder of images (resumable; works under accelerate launch)",
        description="Train LoRA adapters on the UNet attention (and optionally the text encoder) from a folder "
                    "of images with .txt captions or a metadata.jsonl. Flags override keys of --config.",
        epilog="example:\n  t2i train style-data --style outline --out data/outline\n"
               "  t2i train lora --data data/outline --output runs/outline --trigger \"in sks style\" --steps 300\n"
               "  t2i generate \"a red circle, in sks style\" --lora runs/outline/lora.safetensors:1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = lo.add_argument
    a("--config", metavar="TOML", help="a TOML file with any of the keys below (flags win)")
    a("--model", "-m", metavar="PATH|ID", help="base model (default: the bundled t2i-shapes)")
    a("--data", metavar="DIR", help="images with a .txt caption beside each, or a metadata.jsonl")
    a("--reg-data", metavar="DIR", help="regularisation images, trained on their captions without the trigger "
                                         "(default: the base model's own images of the data's captions, made once "
                                         "into OUTPUT/prior)")
    a("--no-prior", dest="prior", action="store_false", default=None,
      help="without --reg-data, train on the data alone (no base-model images): faster to start, but prompts "
           "without the trigger drift towards the data")
    a("--prior-steps", type=positive_int, metavar="N", help="sampling steps of each prior image (default: the model's)")
    a("--prior-loss-weight", type=number, metavar="X",
      help=f"loss weight of the prior (or --reg-data) images against the data's 1 (default {D('prior_loss_weight')})")
    a("--output", "-o", metavar="DIR", help="checkpoints, validation grids and the LoRA file go here")
    a("--name", help="file name of the LoRA (default: lora -> OUT/lora.safetensors)")
    a("--trigger", metavar="TEXT", help='phrase added to every caption, e.g. "in sks style"')
    a("--targets", choices=["attn", "attn-mlp", "all"],
      help=f"UNet layers with LoRA: attention; + the transformer blocks' proj_in/proj_out/feed-forward; all: + the "
           f"ResNet conv1/conv2 (LoCon) (default {D('targets')})")
    a("--rank", type=positive_int, metavar="N", help=f"LoRA rank (default {D('rank')})")
    a("--alpha", type=number, metavar="X", help="LoRA alpha (default: the rank)")
    a("--conv-rank", type=positive_int, metavar="N", help="rank of the ResNet convolutions with --targets all "
                                                           "(default: --rank)")
    a("--conv-alpha", type=number, metavar="X", help="alpha of the ResNet convolutions (default: the conv rank)")
    a("--steps", type=positive_int, metavar="N", help=f"optimizer steps (default {D('steps')})")
    a("--lr", type=number, metavar="X", help=f"learning rate (default {D('lr')})")
    a("--text-encoder-lr", type=number, metavar="X", help="learning rate of the text encoder's LoRA (default: --lr)")
    a("--warmup", type=positive_int, metavar="N", help="linear warm-up steps (default 0)")
    a("--batch", type=positive_int, metavar="N", help=f"images per step and process (default {D('batch')})")
    a("--grad-accum", type=positive_int, metavar="N", help="gradient accumulation steps (default 1)")
    a("--resolution", type=positive_int, metavar="N", help="training side length (default: the model's)")
    a("--no-buckets", dest="buckets", action="store_false", default=None,
      help="crop everything square instead of aspect-ratio buckets")
    a("--train-text-encoder", action="store_true", default=None, help="also train LoRA on the text encoder")
    a("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: no (fp16 needs a GPU)")
    a("--gradient-checkpointing", action="store_true", default=None, help="less memory, ~30%% slower")
    a("--no-cache-latents", dest="cache_latents", action="store_false", default=None,
      help="encode images every step instead of once")
    a("--min-snr-gamma", type=number, metavar="X", help="min-SNR loss weighting (default 5; 0 = off)")
    a("--noise-offset", type=number, metavar="X", help="noise offset (default 0)")
    a("--caption-dropout", type=number, metavar="X", help="fraction of captions replaced by '' (default 0)")
    a("--seed", type=positive_int, metavar="N", help="default 0")
    a("--checkpoint-every", type=positive_int, metavar="N", help="default 100")
    a("--keep-checkpoints", type=positive_int, metavar="N", help="default 2")
    a("--validation-every", type=positive_int, metavar="N", help="steps between validation grids (default 100; 0 = end only)")
    a("--validation-prompt", dest="validation_prompts", action="append", metavar="PROMPT",
      help="repeatable (default: the first two captions)")
    a("--max-bad-steps", type=positive_int, metavar="N", help="stop after this many non-finite steps in a row (default 5)")
    a("--max-minutes", type=number, metavar="X",
      help="stop at the next checkpoint after this many minutes (default 0: no limit); --resume latest goes on")
    a("--format", choices=["kohya", "diffusers"],
      help=f"layout of the LoRA file (default {D('format')}: A1111, ComfyUI and diffusers all read it)")
    a("--resume", metavar="latest|PATH", help="continue from the newest (or this) checkpoint in --output")
    a("--allow-pickle", action="store_true", default=None, help="allow a pickle-based base model (trusted only)")
    lo.set_defaults(func=cmd_train_lora)


def _embedding_default(key: str) -> str:
    from t2i.train.embedding_config import EmbeddingTrainConfig  # no torch

    return _config_default(EmbeddingTrainConfig, key)


def _train_embedding_parser(tsub) -> None:
    D = _embedding_default
    em = tsub.add_parser(
        "embedding", help="textual inversion: learn an embedding (new token vectors) from a folder of images "
                          "(resumable)",
        description="Learn N token vectors that NAME in a prompt stands for, the model frozen (A1111's textual "
                    "inversion). Writes OUT/NAME.safetensors in A1111's layout (emb_params). Flags override keys "
                    "of --config.",
        epilog="example:\n  t2i train style-data --style pastel --out data/pastel\n"
               "  t2i train embedding --data data/pastel --output runs/pastelstyle --token pastelstyle\n"
               "  t2i generate \"a red circle, pastelstyle\" --embedding-dir runs/pastelstyle",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a = em.add_argument
    a("--config", metavar="TOML", help="a TOML file with any of the keys below (flags win)")
    a("--model", "-m", metavar="PATH|ID", help="base model (default: the bundled t2i-shapes)")
    a("--data", metavar="DIR", help="images with a .txt caption beside each, or a metadata.jsonl")
    a("--output", "-o", metavar="DIR", help="checkpoints and the embedding file go here")
    a("--token", metavar="NAME", help="the embedding's name: the word that calls it in prompts, and its file name")
    a("--init-words", metavar="TEXT", help=f"words whose token vectors the embedding starts from "
                                           f"(default {D('init_words')!r})")
    a("--vectors", type=positive_int, metavar="N", help=f"vectors per token (default {D('vectors')})")
    a("--steps", type=positive_int, metavar="N", help=f"optimizer steps (default {D('steps')})")
    a("--lr", type=number, metavar="X", help=f"learning rate (default {D('lr')})")
    a("--batch", type=positive_int, metavar="N", help=f"images per step and process (default {D('batch')})")
    a("--resolution", type=positive_int, metavar="N", help="training side length (default: the model's)")
    a("--no-buckets", dest="buckets", action="store_false", default=None,
      help="crop everything square instead of aspect-ratio buckets")
    a("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: no (fp16 needs a GPU)")
    a("--min-snr-gamma", type=number, metavar="X", help=f"min-SNR loss weighting (default {D('min_snr_gamma')}; 0 = off)")
    a("--seed", type=positive_int, metavar="N", help="default 0")
    a("--checkpoint-every", type=positive_int, metavar="N", help=f"default {D('checkpoint_every')}")
    a("--keep-checkpoints", type=positive_int, metavar="N", help=f"default {D('keep_checkpoints')}")
    a("--max-bad-steps", type=positive_int, metavar="N", help="stop after this many non-finite steps in a row (default 5)")
    a("--max-minutes", type=number, metavar="X",
      help="stop at the next checkpoint after this many minutes (default 0: no limit); --resume latest goes on")
    a("--resume", metavar="latest|PATH", help="continue from the newest (or this) checkpoint in --output")
    a("--allow-pickle", action="store_true", default=None, help="allow a pickle-based base model (trusted only)")
    em.set_defaults(func=cmd_train_embedding)


def cmd_train_embedding(args) -> int:
    from t2i.train import embedding  # deferred: torch and diffusers; --help must not import them

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(embedding.EmbeddingTrainConfig)
             if hasattr(args, f.name)}
    with _notices():
        path = embedding.run(args.config, flags, args.resume)
    if path is not None:
        print(path)
    return 0


def cmd_train_demo(args) -> int:
    from t2i.train import demo  # deferred: torch and diffusers; --help must not import them

    overrides = {"output_dir": args.output_dir, "export_dir": args.export_dir}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: use KEY=VALUE, e.g. unet.steps=6000")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    with _notices():
        demo.run(args.config or "demo", args.stage, None if args.resume == "none" else args.resume, overrides)
    return 0


def cmd_train_lora(args) -> int:
    from t2i.train import lora  # deferred: torch and diffusers; --help must not import them

    # each config key with a flag of the same name; None = flag not given, the file's value stays
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(lora.LoraTrainConfig) if hasattr(args, f.name)}
    with _notices():
        path = lora.run(args.config, flags, args.resume)
    if path is not None:  # the main process of a multi-process run
        print(path)
    return 0


def cmd_style_data(args) -> int:
    from t2i.demo.styles import write_dataset  # deferred: numpy and PIL; --help must not import them

    folder = write_dataset(args.out, args.style, args.n, args.seed)
    print(folder)
    return 0


@contextlib.contextmanager
def _notices():
    """The trainers' progress notes (data, resumes, validation, exports) are notices too: shown at INFO, on stderr
    through the CLI's one notice handler (t2i.log.notices_on_stderr)."""
    logger = logging.getLogger("t2i.train")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)
