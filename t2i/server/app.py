"""The FastAPI application: routes, the job queue, the page, and the safety around them.

    app = create_app(ServerConfig(model=None, lora_dir=Path("loras")))   # then uvicorn.run(app, ...)

Layers, outermost first: one log line per request, HTTP Basic auth (with
--api-auth), the body-size cap, then the routes: A1111's /sdapi/v1 (a1111.py),
t2i's own /t2i/v1 (jobs by id, asynchronous form, health), OpenAI's
/v1/images/generations (openai.py), and the page at / (static/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from t2i.server import engine as core
from t2i.server.auth import BasicAuth, BodyLimit
from t2i.server.queue import JobQueue
from t2i.server.registry import Registry
from t2i.server.workers import ProcessEngine

log = logging.getLogger("t2i.server")


@dataclass
class Limits:
    """What one request may ask for; checked before it is queued (4xx, no compute)."""

    max_side: int = 2048  # pixels, width and height each
    max_steps: int = 150  # A1111's slider maximum
    max_images: int = 16  # batch_size * n_iter (OpenAI: n)
    max_pixel_steps: int = 1024 * 1024 * 50 * 4  # width * height * steps * images
    max_body: int = 64 * 1024 * 1024  # bytes of one request body (base64 images included)
    max_prompt: int = 20_000  # characters of a prompt or negative prompt (each is encoded whole, in chunks)


@dataclass
class ServerConfig:
    model: str | None = None  # --model: path or hub id; None = the bundled t2i-shapes
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: list[tuple[str, str]] = field(default_factory=list)
    model_dir: Path | None = None
    lora_dir: Path | None = None
    embedding_dir: Path | None = None
    out: Path | None = None
    queue: int = 16  # jobs waiting (beyond the running one)
    device: str = "auto"
    devices: list[str] | None = None  # one worker per device (--devices cuda:0,cuda:1); None: [device]
    cors_allow_origins: list[str] = field(default_factory=list)  # none: no cross-origin headers at all
    log_prompts: bool = False
    limits: Limits = field(default_factory=Limits)
    history: int = 64  # finished jobs remembered (status, and async results until fetched or evicted)
    preview_every: float = 1.0  # seconds between live-preview decodes of a running job
    vae_dir: Path | None = None  # --vae-dir: VAEs clients choose by name (override_settings sd_vae)
    client_timeout: float = 30.0  # seconds a request has to arrive whole (t2i.server.http); slower: 408, closed
    # dynamic prompts ({red|blue}, __wildcard__), as A1111 with its Dynamic Prompts extension: each image's
    # prompt resolved from its seed unless off here or in the request (alwayson_scripts)
    dynamic_prompts: bool = True
    wildcard_dir: Path | None = None  # --wildcard-dir: where __NAME__ finds NAME.txt; None: no wildcards
    # --speed: the speed mode of every job (t2i.jobs.Request.speed), as `t2i generate --speed`; options such as
    # compile act on the loaded UNet, so a long-lived server pays torch.compile's start once
    speed: str = "auto"

    def flags(self) -> dict:
        """The server's settings as /sdapi/v1/cmd-flags shows them (never the credentials)."""
        return {"model": self.model, "host": self.host, "port": self.port, "api_auth": bool(self.api_auth),
                "model_dir": str(self.model_dir) if self.model_dir else None,
                "lora_dir": str(self.lora_dir) if self.lora_dir else None,
                "embedding_dir": str(self.embedding_dir) if self.embedding_dir else None,
                "out": str(self.out) if self.out else None, "queue": self.queue, "device": self.device,
                "devices": self.worker_devices, "cors_allow_origins": list(self.cors_allow_origins),
                "log_prompts": self.log_prompts, "vae_dir": str(self.vae_dir) if self.vae_dir else None,
                "wildcard_dir": str(self.wildcard_dir) if self.wildcard_dir else None, "speed": self.speed, "api": True, "nowebui": False, "listen": self.host != "127.0.0.1"}


    @property
    def worker_devices(self) -> list[str]:
        return list(self.devices) if self.devices else [self.device]


class Server:
    """What the routes share: settings, names, the engine and its queue, the selected checkpoint."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.limits = config.limits
        self.registry = Registry(config.model, config.model_dir, config.lora_dir, config.embedding_dir)
        # several devices: a worker process each (t2i.server.workers); one: the engine runs in this process
        engine = ProcessEngine if len(config.worker_devices) > 1 else core.Engine
        self.engines = [engine(device, config.lora_dir, config.out, config.embedding_dir)
                        for device in config.worker_devices]
        for e in self.engines:
            e.speed = config.speed
        self.engine = self.engines[0]
        self.models: dict[str, dict] = {}  # name -> model_info of checkpoints loaded so far
        self.queue = JobQueue(self.engines, config.queue, config.history, self._loaded, config.preview_every)
        self.selected = self.registry.default
        self.started = time.time()

    def _loaded(self, name: str, info: dict) -> None:
        self.models[name] = info
        self.registry.note_hash(name, info.get("hash", ""))

    def model_defaults(self, name: str) -> dict:
        """The loaded (or last loaded) model's defaults; before any load, SD's 512x512 / 20 steps."""
        return self.models.get(name) or {"width": 512, "height": 512, "steps": 20, "guidance": 7.0,
                                         "vae_scale_factor": 8}

    def load_jobs(self, checkpoint) -> list:
        """One job per worker that loads `checkpoint` on its device."""
        from t2i.server.queue import Job, new_id

        return [Job(new_id(), "load", checkpoint, worker=i) for i in range(len(self.engines))]

    def start(self) -> None:
        """Load the selected checkpoint on every worker as its first job, so the first request does not pay."""
        self.queue.start()
        checkpoint = self.registry.checkpoints.get(self.selected)
        if checkpoint is not None:
            for job in self.load_jobs(checkpoint):
                self.queue.submit(job)

    def stop(self) -> None:
        self.queue.stop()
        for engine in self.engines:
            if isinstance(engine, ProcessEngine):
                engine.close()


class RequestLog:
    """One line per request: method, route, status, milliseconds, seed; the prompt only with --log-prompts."""

    def __init__(self, app, log_prompts: bool = False):
        self.app = app
        self.log_prompts = log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]
        state = scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get("path", "")
            line = f"{scope.get('method')} {path} {status[0] or '-'} {(time.perf_counter() - t0) * 1000:.0f} ms"
            seed = state.get("seed")
            if seed is not None:
                line += f" seed={seed}"
            if self.log_prompts and state.get("prompt") is not None:
                line += f" prompt={state['prompt']!r}"
            log.info(line)


def static_dir() -> Path:
    return Path(str(resources.files("t2i.server") / "static"))


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """The application for `config` (its model loads as the first queued job when the app starts)."""
    config = config or ServerConfig()
    server = Server(config)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="t2i", version=core_version(),
                  description="t2i's server: AUTOMATIC1111's API (/sdapi/v1), jobs by id (/t2i/v1), "
                              "OpenAI's images API (/v1/images/generations) and a page at /.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)  # /docs below, from package files
    app.state.server = server
    add_docs(app)

    from t2i.server import a1111, openai, t2iapi

    app.include_router(a1111.router)
    app.include_router(t2iapi.router)
    app.include_router(openai.router)

    static = static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(static / "index.html", media_type="text/html")

    @app.exception_handler(core.T2IError)
    async def t2i_error(request: Request, exc: core.T2IError):
        return JSONResponse({"detail": str(exc)}, status_code=422 if isinstance(exc, core.UsageError) else 500)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError):
        # json.loads of a body nested thousands deep stops at Python's recursion limit: the client's doing
        return JSONResponse({"detail": [{"loc": ["body"], "msg": "the JSON body is nested too deep",
                                         "type": "value_error.t2i"}]}, status_code=400)

    # outermost last: the log sees every answer, CORS answers preflights (which carry no credentials) and
    # adds its headers only for --cors-allow-origins, auth comes before any route reads the body
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body)
    if config.api_auth:
        app.add_middleware(BasicAuth, credentials=config.api_auth)
    if config.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow_origins),
                           allow_credentials="*" not in config.cors_allow_origins,
                           allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(RequestLog, log_prompts=config.log_prompts)
    return app


def swagger_files() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle-v2 package (a copy of swagger-ui-dist), if installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    folder = Path(str(swagger_ui_bundle.swagger_ui_path))
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def add_docs(app: FastAPI) -> None:
    """GET /docs: FastAPI's Swagger page with its script and style served from package files, so it works
    offline (FastAPI's own page loads them from a CDN). Without the package, /docs says how to get it."""
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse

    files = swagger_files()
    if files is not None:
        app.mount("/docs/files", StaticFiles(directory=files), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        if files is None:
            return HTMLResponse("<!doctype html><title>t2i API</title><p>The API page needs the "
                                "<code>swagger-ui-bundle-v2</code> package (<code>pip install swagger-ui-bundle-v2"
                                "</code>); the schema itself is at <a href='/openapi.json'>/openapi.json</a>.",
                                status_code=200)
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="t2i API",
                                   swagger_js_url="/docs/files/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/files/swagger-ui.css",
                                   swagger_favicon_url="/docs/files/favicon-32x32.png",
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def docs_redirect():
        return get_swagger_ui_oauth2_redirect_html()


def core_version() -> str:
    from t2i import __version__

    return __version__
