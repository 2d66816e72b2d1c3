"""`t2i serve` on many machines: the same app (routes, queue, engine) as a Ray Serve deployment.

Each replica is a whole `t2i serve`: its own model, job queue and worker(s), on the devices Ray gives it;
Ray Serve's proxy spreads requests over the replicas and over machines. Nothing here generates: the
replica runs `create_app(config)`, so an image is the one `t2i serve` (and `t2i generate`) makes.

    # python: two replicas, one GPU each
    from ray import serve
    from t2i.server import ServerConfig
    from t2i.server.ray_serve import deployment
    serve.run(deployment(ServerConfig(model_dir=Path("models")), replicas=2, gpus=1), route_prefix="/")

    # or Ray's own command (arguments as `key=value`; see `app`)
    serve run t2i.server.ray_serve:app model_dir=/models replicas=2 gpus=1

A job's id lives in the replica that runs it: with more than one replica, use the synchronous routes
(A1111's txt2img/img2img, OpenAI's), not /t2i/v1/jobs/{id} polling, which may reach another replica.
"""

from __future__ import annotations

from pathlib import Path

from t2i.server.app import ServerConfig, create_app


class T2IReplica:
    """One replica: the `t2i serve` app for `config`, built on the replica (its model loads there)."""

    def __init__(self, config: ServerConfig):
        self.config = config

    def __serve_build_asgi_app__(self):
        return create_app(self.config)


def deployment(config: ServerConfig | None = None, replicas: int = 1, gpus: float = 0, cpus: float = 1,
               max_ongoing_requests: int | None = None):
    """A bound Ray Serve application of `replicas` copies of `t2i serve` (each with `gpus` GPUs and `cpus` CPUs).

    `max_ongoing_requests` (default: the queue bound + 32, room for progress and health polls) is how many
    requests Ray hands one replica at once; the replica's own queue answers 503 + Retry-After beyond
    `config.queue`, as `t2i serve` does.
    """
    from ray import serve

    config = config or ServerConfig()
    cls = serve.ingress()(T2IReplica)
    options = {"num_cpus": cpus}
    if gpus:
        options["num_gpus"] = gpus
    dep = serve.deployment(name="t2i", num_replicas=replicas, ray_actor_options=options,
                           max_ongoing_requests=max_ongoing_requests or config.queue + 32)(cls)
    return dep.bind(config)


def app(args: dict[str, str]):
    """An application builder for `serve run t2i.server.ray_serve:app key=value ...`: `model`, `model_dir`,
    `lora_dir`, `embedding_dir`, `vae_dir`, `wildcard_dir`, `out`, `queue`, `device`, `devices` (comma-separated),
    `speed`, `api_auth` (USER:PASS[,...]), `replicas`, `gpus`, `cpus`."""
    from t2i.server.auth import parse_credentials

    folder = lambda key: Path(args[key]) if args.get(key) else None  # noqa: E731
    config = ServerConfig(model=args.get("model"), model_dir=folder("model_dir"), lora_dir=folder("lora_dir"),
                          embedding_dir=folder("embedding_dir"), vae_dir=folder("vae_dir"),
                          wildcard_dir=folder("wildcard_dir"), speed=args.get("speed", "auto"), out=folder("out"),
                          queue=int(args.get("queue", 16)), device=args.get("device", "auto"),
                          devices=args["devices"].split(",") if args.get("devices") else None,
                          api_auth=parse_credentials(args["api_auth"]) if args.get("api_auth") else [])
    return deployment(config, replicas=int(args.get("replicas", 1)), gpus=float(args.get("gpus", 0)),
                      cpus=float(args.get("cpus", 1)))
