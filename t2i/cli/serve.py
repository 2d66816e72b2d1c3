"""`t2i serve`: the arguments, checked before any model loads, then uvicorn.

    t2i serve                                   bundled model, http://127.0.0.1:7860
    t2i serve --model-dir models/ --lora-dir loras/ --out served/ --api-auth me:secret
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DESCRIPTION = ("Serve a web page at / and AUTOMATIC1111's HTTP API at /sdapi/v1 (plus jobs by id at /t2i/v1 and "
               "OpenAI's /v1/images/generations), with the model kept loaded. Binds 127.0.0.1 unless --host says "
               "otherwise; see docs/server.md.")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 1..65535")
    return value


def _queue(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--queue must be 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"--client-timeout must be more than 0 and at most 3600 s, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `t2i serve` on the CLI's subparsers."""
    s = subparsers.add_parser("serve", help="web page and A1111-compatible HTTP API, model kept loaded",
                              description=DESCRIPTION)
    s.add_argument("--model", "-m", metavar="PATH|ID",
                   help="the checkpoint selected at start (default: the bundled t2i-shapes)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=7860, help="default 7860, as A1111")
    s.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP Basic credentials every route needs, the page included")
    s.add_argument("--model-dir", metavar="DIR", help="checkpoints clients may switch to by name "
                                                      "(diffusers folders and .safetensors files)")
    s.add_argument("--lora-dir", metavar="DIR", help="where <lora:NAME:W> finds NAME.safetensors")
    s.add_argument("--vae-dir", metavar="DIR", help="VAEs clients may choose by name (A1111's models/VAE; "
                                                    "also NAME.vae.safetensors in --model-dir)")
    s.add_argument("--embedding-dir", metavar="DIR", help="textual-inversion embeddings: a prompt calls DIR/NAME.safetensors by NAME, as in A1111")
    s.add_argument("--wildcard-dir", metavar="DIR", help="where __NAME__ in a prompt finds NAME.txt (dynamic prompts; "
                                                         "default: no wildcards)")
    s.add_argument("--speed", metavar="OPTS", default="auto",
                   help="the speed mode of every job, as t2i generate --speed: auto (default), exact, or options "
                        "such as compile (torch.compile of the UNet: the first job compiles, later ones reuse it), "
                        "channels_last, cache3; recorded in each PNG (docs/speed.md)")
    s.add_argument("--no-dynamic-prompts", action="store_true",
                   help="keep {, } and __ in prompts as written (A1111 without its Dynamic Prompts extension)")
    s.add_argument("--out", "-o", metavar="DIR", help="also save every image here (numbered, never overwriting)")
    s.add_argument("--queue", type=_queue, default=16, metavar="N",
                   help="jobs that may wait behind the running one; more get 503 (default 16)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="default: auto")
    s.add_argument("--devices", metavar="DEV,DEV,...",
                   help="one worker process per device, each with its own copy of the model, taking jobs from one queue "
                        "(e.g. cuda:0,cuda:1; cpu,cpu runs two CPU workers); overrides --device")
    s.add_argument("--cors-allow-origins", metavar="ORIGIN[,ORIGIN2]",
                   help="web origins whose pages may call this API from a browser (e.g. http://localhost:3000); "
                        "default: none, no cross-origin headers are sent")
    s.add_argument("--log-prompts", action="store_true", help="write prompts into the request log")
    s.add_argument("--client-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="seconds a client has to send a whole request, headers and body; slower ones get 408 and "
                        "are disconnected (default 30; generating has no limit)")
    s.set_defaults(func=cmd_serve)
    return s


def _folder(value: str | None, flag: str) -> Path | None:
    if value is None:
        return None
    from t2i.server.errors import ConfigError

    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{flag} {value} is not a folder")
    return path


def _speed(text: str, device: str, devices: list[str] | None) -> str:
    """--speed checked as `t2i generate` checks it (names, values, what the devices can run); no model loads."""
    from t2i.server.errors import ConfigError
    from t2i.speed import SpeedOptions

    options = SpeedOptions.parse(text)  # a one-line UsageError for a bad name or value
    if options.cpu_offload and any(not d.startswith("cuda") for d in devices or [device]):
        raise ConfigError("--speed cpu_offload needs CUDA devices (--device cuda or --devices cuda:0,...); leave it off")
    if options.tiny_vae is not None:
        raise ConfigError("--speed tiny_vae is not offered by the server (it depends on the checkpoint; "
                          "the server's previews already use a model's vae_tiny/); leave it off")
    return text


def config_from_args(args):
    """ServerConfig from `t2i serve` arguments; every check that needs no model, here (one-line errors)."""
    from t2i.server.app import ServerConfig
    from t2i.server.auth import parse_credentials
    from t2i.server.engine import resolve_model

    if args.model is not None:
        resolve_model(args.model)  # exists (or is a hub id); nothing loads
    out = None
    if args.out is not None:
        from t2i.guards import check_writable_folder

        out = check_writable_folder(args.out)
    if args.device != "auto":
        from t2i.devices import resolve_device

        resolve_device(args.device)
    devices = _devices(args.devices) if args.devices is not None else None
    origins = _origins(args.cors_allow_origins) if args.cors_allow_origins is not None else []
    return ServerConfig(model=args.model, host=args.host, port=args.port,
                        api_auth=parse_credentials(args.api_auth) if args.api_auth is not None else [],
                        model_dir=_folder(args.model_dir, "--model-dir"), lora_dir=_folder(args.lora_dir, "--lora-dir"),
                        embedding_dir=_folder(args.embedding_dir, "--embedding-dir"), out=out, queue=args.queue,
                        device=args.device, devices=devices, cors_allow_origins=origins,
                        log_prompts=args.log_prompts, client_timeout=args.client_timeout,
                        vae_dir=_folder(getattr(args, "vae_dir", None), "--vae-dir"),
                        wildcard_dir=_folder(getattr(args, "wildcard_dir", None), "--wildcard-dir"),
                        dynamic_prompts=not getattr(args, "no_dynamic_prompts", False),
                        speed=_speed(args.speed, args.device, devices))


def _devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'], each one that exists (one-line ConfigError otherwise)."""
    import torch

    from t2i.devices import resolve_device
    from t2i.server.errors import ConfigError

    names = [d.strip() for d in text.split(",")]
    if not all(names):
        raise ConfigError(f"--devices takes a comma-separated list such as cuda:0,cuda:1, got {text!r}")
    for name in names:
        device = resolve_device(name)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--devices {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return names


def _origins(text: str) -> list[str]:
    """'http://a:3000,https://b' -> the origins, each scheme://host[:port] (or '*', which needs saying)."""
    from urllib.parse import urlsplit

    from t2i.server.errors import ConfigError

    origins = [o.strip().rstrip("/") for o in text.split(",")]
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise ConfigError(f"--cors-allow-origins {origin!r} is not an origin; give scheme://host[:port], "
                              "e.g. http://localhost:3000")
    return origins


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a line is logged (in-process callers swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def cmd_serve(args) -> int:
    config = config_from_args(args)
    if "*" in config.cors_allow_origins:
        print("t2i: warning: --cors-allow-origins '*' lets any web page a visitor opens call this server",
              file=sys.stderr)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_auth:
        print(f"t2i: warning: serving on {config.host} without --api-auth: anyone who can reach this machine "
              "can use it", file=sys.stderr)
    log = logging.getLogger("t2i.server")  # the request log only; other libraries keep their own levels
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s t2i: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    import uvicorn

    from t2i.server.app import create_app
    from t2i.server.http import uvicorn_options

    app = create_app(config)
    print(f"t2i: serving on http://{config.host}:{config.port}/ (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, **uvicorn_options(config))
    return 0
