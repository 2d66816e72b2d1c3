"""t2i's own routes, /t2i/v1/...: jobs by id, the asynchronous form, health.

    POST /t2i/v1/jobs                 a txt2img or img2img body (init_images => img2img); 202 with the id
    GET  /t2i/v1/jobs/{id}            state, progress, step, position in the queue
    GET  /t2i/v1/jobs/{id}/result     A1111's response once done (409 while it runs)
    GET  /t2i/v1/jobs/{id}/events     Server-Sent Events: `progress` on each change, then `done`
    DELETE /t2i/v1/jobs/{id}          drop a queued job, interrupt a running one
    GET  /t2i/v1/health               answers during a job too
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from t2i.server import a1111
from t2i.server.queue import DONE, FINISHED, INTERRUPTED

router = APIRouter(prefix="/t2i/v1", tags=["t2i"])


def _job(request: Request, job_id: str):
    job = request.app.state.server.queue.get(job_id)
    if job is None or job.kind != "generate":
        raise HTTPException(404, f"no job job_id={job_id!r} (unknown, or finished long ago)")
    return job


def _status(server, job) -> dict:
    s = job.status()
    s["queue_position"] = server.queue.position(job)
    return s


def _parse(body: dict):
    """A txt2img body, or with init_images an img2img one, validated by its own model (422s name the field)."""
    model = a1111.Img2ImgRequest if body.get("init_images") else a1111.Txt2ImgRequest
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@router.post("/jobs", status_code=202, openapi_extra={"requestBody": {"content": {"application/json": {
    "schema": {"anyOf": [{"$ref": "#/components/schemas/Txt2ImgRequest"},
                         {"$ref": "#/components/schemas/Img2ImgRequest"}]}}}, "required": True}})
async def submit_job(request: Request, body: dict[str, Any] = Body(...)):
    """Queue a txt2img (or, with init_images, img2img) request; answers at once with the job's id."""
    server = request.app.state.server
    req = _parse(body)
    task = "img2img" if isinstance(req, a1111.Img2ImgRequest) else "txt2img"
    images = await a1111.decode_img2img(req) if task == "img2img" else None
    dynamic = await run_in_threadpool(a1111.dynamic_prompts_mode, server, req)  # a long template parses for seconds
    gen, checkpoint = a1111.build_request(server, req, task, images, dynamic)
    request.scope.setdefault("state", {}).update(seed=gen.seed, prompt=gen.prompt)
    job = a1111.new_job(server, gen, checkpoint, a1111._echo(req), req.force_task_id)
    a1111.submit(server, job)
    base = f"/t2i/v1/jobs/{job.id}"
    return {"id": job.id, "state": job.state, "seed": gen.seed, "status_url": base, "result_url": base + "/result",
            "events_url": base + "/events"}


@router.get("/jobs/{job_id}")
async def job_status(job_id: str, request: Request):
    return _status(request.app.state.server, _job(request, job_id))


@router.get("/jobs/{job_id}/result")
async def job_result(job_id: str, request: Request):
    server = request.app.state.server
    job = _job(request, job_id)
    if job.state not in FINISHED:
        return JSONResponse({"detail": f"job {job_id} is {job.state}", **_status(server, job)}, status_code=409)
    if job.state not in (DONE, INTERRUPTED):
        status = job.error.status if job.error else 500
        raise HTTPException(status if 400 <= status < 600 else 410, job.error.message if job.error else job.state)
    if job.output is None:
        raise HTTPException(410, f"the images of job {job_id} are no longer kept")
    return await run_in_threadpool(a1111.result, server, job)


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    server = request.app.state.server
    job = _job(request, job_id)
    server.queue.cancel(job)
    return _status(server, job)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request):
    """Server-Sent Events: a `progress` event whenever the job changes, then one `done` event; at most
    one event per 0.2 s."""
    server = request.app.state.server
    job = _job(request, job_id)

    async def stream():
        seen = -1
        while True:
            if await request.is_disconnected():
                return
            if job.version != seen:
                seen = job.version
                finished = job.state in FINISHED
                data = json.dumps(_status(server, job))
                yield f"event: {'done' if finished else 'progress'}\ndata: {data}\n\n"
                if finished:
                    return
            await asyncio.sleep(0.2)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/health")
async def health(request: Request):
    server = request.app.state.server
    running = server.queue.running
    return {"status": "ok", "model": server.selected, "loaded": server.engine.loaded,
            "running": running[0].id if running else None, "queued": server.queue.waiting,
            "workers": [{"device": e.device, "loaded": e.loaded} for e in server.engines],
            "running_jobs": [j.id for j in running]}


@router.get("/models")
async def models(request: Request):
    """The selected checkpoint's defaults (what an omitted field becomes) and the names a request may use."""
    server = request.app.state.server
    return {"selected": server.selected, "defaults": server.model_defaults(server.selected),
            "checkpoints": list(server.registry.checkpoints), "loras": list(server.registry.loras),
            "limits": vars(server.limits)}
