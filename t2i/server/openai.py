"""OpenAI's image API, `POST /v1/images/generations`, for clients that speak it (b64_json only).

    {"prompt": "a red circle", "n": 2, "size": "64x64", "response_format": "b64_json"}
    -> {"created": 1700000000, "data": [{"b64_json": "...", "revised_prompt": "a red circle"}, ...]}

`model` names a checkpoint of this server (GET /sdapi/v1/sd-models), or is left
out for the selected one. t2i extensions: `seed`, `negative_prompt`, `steps`,
`cfg_scale`, `sampler_name`. Errors come in OpenAI's shape, {"error": {...}}.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from t2i.server import a1111
from t2i.server.queue import b64

router = APIRouter(tags=["OpenAI"])


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT; default: the model's native size")
    response_format: str = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # t2i's extensions
    seed: int = -1
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


def _size(text: str | None) -> tuple[int | None, int | None]:
    if text is None or text == "auto":
        return None, None
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise ValueError("size must be WIDTHxHEIGHT, e.g. 512x512")
    return int(w), int(h)


@router.post("/v1/images/generations", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ImageGenerationRequest.model_json_schema()}}}})
async def generations(request: Request):
    """Generate `n` images; answers `b64_json` (a `url` answer would need storage t2i does not keep)."""
    try:
        body = ImageGenerationRequest.model_validate(await request.json())
    except ValidationError as e:
        first = e.errors()[0]
        if not first["loc"]:  # not an object at all
            return _error(422, f"the body must be a JSON object: {first['msg']}", "body")
        return _error(422, f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}", str(first["loc"][0]))
    except ValueError:
        return _error(400, "the body must be JSON")
    if body.response_format != "b64_json":
        return _error(400, f"response_format {body.response_format!r} is not supported; use b64_json",
                      "response_format")
    for field, value, fine in (("quality", body.quality, (None, "auto", "standard")),
                               ("style", body.style, (None,))):
        if value not in fine:
            return _error(400, f"{field} {value!r} is not supported by t2i", field)
    try:
        width, height = _size(body.size)
    except ValueError as e:
        return _error(400, str(e), "size")
    override = {"sd_model_checkpoint": body.model} if body.model else {}
    req = a1111.Txt2ImgRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, seed=body.seed,
                               batch_size=body.n, width=width, height=height, steps=body.steps,
                               cfg_scale=body.cfg_scale, sampler_name=body.sampler_name,
                               override_settings=override)
    server = request.app.state.server
    try:
        gen, checkpoint = a1111.build_request(server, req, "txt2img")
        request.scope.setdefault("state", {}).update(seed=gen.seed, prompt=gen.prompt)
        job = a1111.submit(server, a1111.new_job(server, gen, checkpoint, a1111._echo(req), None))
        job = await a1111.wait_for(server, job, request)
    except HTTPException as e:
        detail = e.detail
        message = detail[0]["msg"] if isinstance(detail, list) else str(detail)
        param = {"batch_size": "n", "width": "size", "height": "size"}.get(
            detail[0]["loc"][-1], detail[0]["loc"][-1]) if isinstance(detail, list) else None
        response = _error(e.status_code, message, param)
        for k, v in (e.headers or {}).items():
            response.headers[k] = v
        return response
    pngs = job.output.pngs if job.output else []
    data = await run_in_threadpool(lambda: [{"b64_json": b64(p), "revised_prompt": body.prompt} for p in pngs])
    server.queue.release(job)
    return {"created": int(time.time()), "data": data}
