"""Scaling out: one worker per device in one server (`--devices`, tested with two CPU workers), and many
machines through Ray Serve (t2i/server/ray_serve.py, run here on one machine in a private network
namespace), each giving the pixels a single `t2i serve` gives.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO
from srv import FAST, decode, wait_until
from t2i.server import Limits

A = "/sdapi/v1"
LONG = {"prompt": "a long one", "steps": 3000, "width": 32, "height": 32, "seed": 1}
ROOMY = Limits(max_steps=5000, max_pixel_steps=10**10)
BODIES = [{"prompt": f"shape number {i}", "seed": 500 + i, **FAST} for i in range(4)] + [
    {"prompt": "two of them", "seed": 9, "batch_size": 2, "n_iter": 2, **FAST}]


def pixels(answer: dict) -> list[bytes]:
    return [decode(b).tobytes() for b in answer["images"]]


def test_two_worker_processes_run_two_jobs_at_once_and_a_dead_one_costs_only_its_job(make_client, client):
    """Two workers, each a process of its own: two jobs at once, an interrupt stops both, each image equals the
    single-worker one. kill -9 of a worker mid-job: that request gets one line naming the worker, the server
    goes on, and the dead worker's next job starts a fresh process that gives the same pixels again."""
    c = make_client(devices=["cpu", "cpu"], limits=ROOMY)
    health = c.get("/t2i/v1/health").json()
    assert [w["device"] for w in health["workers"]] == ["cpu", "cpu"]
    wait_until(lambda: all(w["loaded"] for w in c.get("/t2i/v1/health").json()["workers"]), timeout=180)  # loaded at start
    for job_id in ("one", "two"):
        c.post("/t2i/v1/jobs", json={**LONG, "force_task_id": job_id})
    both = wait_until(lambda: (h := c.get("/t2i/v1/health").json())["running_jobs"] and
                      len(h["running_jobs"]) == 2 and h)
    assert sorted(both["running_jobs"]) == ["one", "two"]
    steps = [c.get(f"/t2i/v1/jobs/{j}").json()["step"] for j in ("one", "two")]
    wait_until(lambda: all(c.get(f"/t2i/v1/jobs/{j}").json()["step"] > s for j, s in zip(("one", "two"), steps)))
    c.post(f"{A}/interrupt")  # A1111's interrupt names no job: it stops every running one
    for job_id in ("one", "two"):
        wait_until(lambda: c.get(f"/t2i/v1/jobs/{job_id}").json()["state"] == "interrupted")
    single = [pixels(client.post(f"{A}/txt2img", json=b).json()) for b in BODIES]
    pids = {e.pid for e in c.app.state.server.engines}
    assert len(pids) == 2 and os.getpid() not in pids  # a process per device
    with concurrent.futures.ThreadPoolExecutor(len(BODIES)) as pool:
        double = list(pool.map(lambda b: pixels(c.post(f"{A}/txt2img", json=b).json()), BODIES))
    assert double == single

    # kill -9 of a worker mid-job
    c.post("/t2i/v1/jobs", json={**LONG, "force_task_id": "victim"})
    wait_until(lambda: c.get("/t2i/v1/jobs/victim").json()["step"] > 1)
    preview = wait_until(lambda: c.get(f"{A}/progress").json()["current_image"])  # decoded in the worker
    assert decode(preview).size == (32, 32)
    engines = c.app.state.server.engines
    victim = next(e for e in engines if e.loaded and e.hook is not None)
    os.kill(victim.pid, 9)
    failed = wait_until(lambda: (j := c.get("/t2i/v1/jobs/victim").json())["state"] == "failed" and j)
    assert "worker process on cpu ended" in failed["error"] and "\n" not in failed["error"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # both workers busy again, one of them new
        again = list(pool.map(lambda b: pixels(c.post(f"{A}/txt2img", json=b).json()), BODIES[:3]))
    assert again == single[:3]
    assert all(e.pid is not None for e in engines)


def test_devices_flag(run_cli, monkeypatch, tiny_sd):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    code, out, err = run_cli("serve", "--model", tiny_sd, "--devices", "cpu,cpu")
    assert code == 0
    assert [e.device for e in seen["app"].state.server.engines] == ["cpu", "cpu"]
    for bad, words in (("cpu,,cpu", "comma-separated"), ("tpu:0", "unknown device")):
        code, out, err = run_cli("serve", "--model", tiny_sd, "--devices", bad)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def _netns_ok() -> str | None:
    """None if this process may run a command in a private network namespace with its loopback up, else why."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip is missing (util-linux, iproute2)"
    r = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -n failed: {r.stderr.strip()}"


def test_a_ray_serve_deployment_gives_the_pixels_of_t2i_serve(client, tiny_sd, tmp_path):
    """Ray's head, its workers and Serve's proxy start on this machine in a private network namespace (Ray's own
    servers listen on every address; there, only on a loopback no one else shares); the same requests give
    the same images as `t2i serve`."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[test]')")
    why = _netns_ok()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Ray test: {why}")
        pytest.skip(why)
    requests = [[f"{A}/txt2img", b] for b in BODIES[:2] + BODIES[-1:]] + [
        ["/v1/images/generations", {"prompt": "a red circle", "n": 2, "size": "32x32", "seed": 3, "steps": 2}]]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    script = f"ip link set lo up && exec {sys.executable} tests/server/ray_run.py {tiny_sd} " \
             f"{tmp_path / 'requests.json'} {tmp_path / 'answers.json'}"
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "answers.json").read_text())
    for (route, body), answer in zip(requests, out["answers"]):
        assert answer["status"] == 200, answer
        mine = client.post(route, json=body).json()
        if route.startswith(A):
            assert pixels(answer["body"]) == pixels(mine)
            assert json.loads(answer["body"]["info"])["infotexts"] == json.loads(mine["info"])["infotexts"]
        else:
            assert [decode(d["b64_json"]).tobytes() for d in answer["body"]["data"]] == \
                [decode(d["b64_json"]).tobytes() for d in mine["data"]]
    assert out["health"]["status"] == "ok"
    print(f"ray: started in {out['started_s']} s, {len(requests)} requests, {out['total_s']} s in all")
