"""`t2i serve`: a web page and AUTOMATIC1111's HTTP API over t2i's pipelines (see docs/server.md).

    from t2i.server import ServerConfig, create_app
    app = create_app(ServerConfig(lora_dir=Path("loras")))     # an ASGI app: uvicorn.run(app)

Nothing heavy is imported until used: the CLI (t2i.cli.serve) imports nothing of it to list `serve`.
"""

__all__ = ["Limits", "ServerConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from t2i.server import app

        return getattr(app, name)
    raise AttributeError(f"module 't2i.server' has no attribute {name!r}")
