"""The job queue: order, concurrency, limits, interrupt, skip, disconnects, progress and previews.

Long jobs are many steps of the tiny model (a few ms each), stopped by the tests themselves.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import socket
import time

import httpx

from srv import FAST, wait_until
from t2i.server import Limits

A = "/sdapi/v1"
LONG = {"prompt": "a long one", "steps": 3000, "width": 32, "height": 32, "seed": 1}
ROOMY = Limits(max_steps=5000, max_pixel_steps=10**10)


def start_long(client, job_id: str) -> dict:
    r = client.post("/t2i/v1/jobs", json={**LONG, "force_task_id": job_id})
    assert r.status_code == 202, r.text
    wait_until(lambda: client.get(f"/t2i/v1/jobs/{job_id}").json()["step"] >= 2)
    return r.json()


def test_concurrent_clients_get_what_they_would_alone(live):
    url = live()
    bodies = [{"prompt": f"shape {i}", "seed": 100 + i, **FAST} for i in range(6)]
    with httpx.Client(base_url=url, timeout=60) as c:
        alone = [c.post(f"{A}/txt2img", json=b).json()["images"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        def one(body):
            with httpx.Client(base_url=url, timeout=60) as c:
                return c.post(f"{A}/txt2img", json=body).json()["images"]
        together = list(pool.map(one, bodies))
    assert together == alone


def test_health_and_progress_answer_during_a_job(make_client):
    c = make_client(limits=ROOMY)
    start_long(c, "long")
    t0 = time.perf_counter()
    assert c.get("/t2i/v1/health").json()["running"] == "long"
    p = c.get(f"{A}/progress").json()
    assert time.perf_counter() - t0 < 5  # answered while the worker computes
    assert 0 < p["progress"] < 1 and p["state"]["job"] == "long" and p["state"]["job_count"] == 1
    assert p["state"]["sampling_steps"] == 3000 and p["eta_relative"] > 0
    preview = wait_until(lambda: c.get(f"{A}/progress").json()["current_image"])  # a live preview, decoded
    assert base64.b64decode(preview).startswith(b"\x89PNG")
    assert c.get(f"{A}/progress", params={"skip_current_image": True}).json()["current_image"] is None
    c.post(f"{A}/interrupt")
    wait_until(lambda: c.get("/t2i/v1/jobs/long").json()["state"] == "interrupted")


def test_interrupt_stops_within_a_step_or_two(make_client):
    c = make_client(limits=ROOMY)
    start_long(c, "stop-me")
    assert c.post(f"{A}/interrupt").json() == {}
    seen = c.get("/t2i/v1/jobs/stop-me").json()["step"]  # the flag is set: at most the step under way ends
    status = wait_until(lambda: (s := c.get("/t2i/v1/jobs/stop-me").json())["state"] == "interrupted" and s)
    assert status["step"] <= seen + 1 < 3000
    result = c.get("/t2i/v1/jobs/stop-me/result").json()
    assert result["images"] == [] and json.loads(result["info"])["interrupted"] is True
    # the worker goes on with the next job
    assert c.post(f"{A}/txt2img", json={"prompt": "next", **FAST}).status_code == 200


def test_interrupt_reaches_a_waiting_sync_client(live):
    url = live(limits=ROOMY)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: httpx.post(f"{url}{A}/txt2img", json={**LONG, "force_task_id": "sync"}, timeout=60))
        with httpx.Client(base_url=url, timeout=10) as c:
            wait_until(lambda: c.get(f"{A}/progress").json()["state"]["sampling_step"] >= 2)
            c.post(f"{A}/interrupt")
        r = fut.result(timeout=60)
    assert r.status_code == 200 and json.loads(r.json()["info"])["interrupted"] is True


def test_skip_goes_on_with_the_next_iteration(make_client):
    c = make_client(limits=ROOMY)
    c.post("/t2i/v1/jobs", json={**LONG, "steps": 1500, "n_iter": 2, "force_task_id": "two"})
    wait_until(lambda: c.get("/t2i/v1/jobs/two").json()["step"] >= 2)
    c.post(f"{A}/skip")
    wait_until(lambda: c.get("/t2i/v1/jobs/two").json()["iteration"] == 1)
    c.post(f"{A}/interrupt")
    wait_until(lambda: c.get("/t2i/v1/jobs/two").json()["state"] == "interrupted")
    info = json.loads(c.get("/t2i/v1/jobs/two/result").json()["info"])
    assert info["skipped_iterations"] == 1


def test_a_full_queue_answers_503_with_retry_after(make_client):
    c = make_client(limits=ROOMY, queue=1)
    start_long(c, "runner")
    assert c.post("/t2i/v1/jobs", json={"prompt": "waits", **FAST, "force_task_id": "waiter"}).status_code == 202
    r = c.post(f"{A}/txt2img", json={"prompt": "no room", **FAST})
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert c.get(f"{A}/progress", params={"id_task": "waiter"}).json()["textinfo"] == "In queue, position 1"
    assert c.post("/t2i/v1/jobs", json={**FAST, "force_task_id": "runner"}).status_code == 409  # ids are unique
    c.post(f"{A}/interrupt")
    wait_until(lambda: c.get("/t2i/v1/jobs/waiter").json()["state"] == "done")
    assert c.post(f"{A}/txt2img", json={"prompt": "room again", **FAST}).status_code == 200


def test_cancel_a_queued_job(make_client):
    c = make_client(limits=ROOMY)
    start_long(c, "first")
    c.post("/t2i/v1/jobs", json={"prompt": "later", **FAST, "force_task_id": "later"})
    assert c.delete("/t2i/v1/jobs/later").json()["state"] == "cancelled"
    c.delete("/t2i/v1/jobs/first")
    wait_until(lambda: c.get("/t2i/v1/jobs/first").json()["state"] == "interrupted")
    assert c.get("/t2i/v1/jobs/later/result").status_code == 410


def test_a_client_that_disconnects_frees_its_place(live):
    url = live(limits=ROOMY)
    with httpx.Client(base_url=url, timeout=10) as c:
        c.post("/t2i/v1/jobs", json={**LONG, "force_task_id": "busy"})
        wait_until(lambda: c.get("/t2i/v1/jobs/busy").json()["step"] >= 2)
        body = json.dumps({"prompt": "gone", **FAST, "force_task_id": "gone"}).encode()
        with socket.create_connection((url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: c.get("/t2i/v1/jobs/gone").status_code == 200)
            assert c.get("/t2i/v1/jobs/gone").json()["state"] == "queued"
        wait_until(lambda: c.get("/t2i/v1/jobs/gone").json()["state"] == "cancelled", timeout=10)
        assert c.get("/t2i/v1/jobs/busy").json()["state"] == "running"  # the running job is someone else's
        c.post(f"{A}/interrupt")


def test_a_running_job_whose_client_left_is_interrupted(live):
    url = live(limits=ROOMY)
    body = json.dumps({**LONG, "force_task_id": "left"}).encode()
    with httpx.Client(base_url=url, timeout=10) as c:
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: c.get("/t2i/v1/jobs/left").status_code == 200
                       and c.get("/t2i/v1/jobs/left").json()["step"] >= 2)
        wait_until(lambda: c.get("/t2i/v1/jobs/left").json()["state"] == "interrupted", timeout=10)


def test_event_stream_reports_progress_then_done(live):
    url = live(limits=ROOMY)
    with httpx.Client(base_url=url, timeout=30) as c:
        job = c.post("/t2i/v1/jobs", json={**LONG, "steps": 400, "force_task_id": "streamed"}).json()
        events = []
        with c.stream("GET", job["events_url"]) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                if len(events) == 3:
                    c.post(f"{A}/interrupt")
                if line.startswith("data: ") and events[-1] == "done":
                    assert json.loads(line[6:])["state"] == "interrupted"
                    break
    assert events[0] == "progress" and events[-1] == "done"


def test_requests_log_one_line_without_the_prompt(make_client, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="t2i.server")
    c = make_client()
    c.post(f"{A}/txt2img", json={"prompt": "secret words", "seed": 42, **FAST})
    lines = [r.getMessage() for r in caplog.records if "txt2img" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("POST /sdapi/v1/txt2img 200 ") and "seed=42" in lines[0]
    assert "secret" not in caplog.text
    caplog.clear()
    c = make_client(log_prompts=True)
    c.post(f"{A}/txt2img", json={"prompt": "secret words", "seed": 42, **FAST})
    assert "secret words" in caplog.text
