"""Load: concurrent clients against a real uvicorn on 127.0.0.1, for a fixed number of requests.

Every answer is the image the same request gets alone; health and progress answer during the load; memory
and file descriptors do not grow; a full queue answers 503 with Retry-After at once, and the clients that
honour it get their images. The loops are bounded in count and time.

T2I_LOAD_REQUESTS sets the number of requests (default 64); T2I_FIGURES_DIR, if set, receives load.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import httpx
import psutil

from srv import FAST, wait_until
from t2i.server import Limits

A = "/sdapi/v1"
CLIENTS = 8
REQUESTS = int(os.environ.get("T2I_LOAD_REQUESTS", "64"))
BODIES = [{"prompt": f"shape number {i}", "seed": 1000 + i, **FAST} for i in range(CLIENTS)]
LONG = {"prompt": "a long one", "steps": 3000, "width": 32, "height": 32, "seed": 1}
ROOMY = Limits(max_steps=5000, max_pixel_steps=10**10)


def figures(name: str, data: dict) -> None:
    folder = os.environ.get("T2I_FIGURES_DIR")
    if folder:
        with open(os.path.join(folder, name), "w") as f:
            json.dump(data, f, indent=1)


def pixels_of(body: dict) -> list[str]:
    """The images of an answer, without their PNG text (the infotext carries no per-request variation, but the
    comparison is of pixels)."""
    from srv import decode

    return [decode(b).tobytes().hex() for b in body["images"]]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load(url: str, alone: list[list[str]]) -> dict:
    """CLIENTS clients share REQUESTS requests; one more task polls health and progress every 50 ms."""
    latencies = {"health": [], "progress": []}
    rss: list[tuple[int, float]] = []  # (requests answered, this process's RSS in MiB), every poll
    results: list[tuple[int, int, bool]] = []
    todo = list(range(REQUESTS))
    done = asyncio.Event()
    deadline = time.time() + 600  # bounded in time as in count

    async def client(k: int):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while todo and time.time() < deadline:
                i = todo.pop()
                r = await c.post(f"{A}/txt2img", json=BODIES[i % CLIENTS])
                same = r.status_code == 200 and pixels_of(r.json()) == alone[i % CLIENTS]
                results.append((i, r.status_code, same))  # a flag, not the pixels: memory is measured

    async def poller():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            while not done.is_set() and time.time() < deadline:
                for name, route in (("health", "/t2i/v1/health"), ("progress", f"{A}/progress")):
                    t0 = time.perf_counter()
                    r = await c.get(route)
                    latencies[name].append(time.perf_counter() - t0)
                    assert r.status_code == 200
                rss.append((len(results), psutil.Process().memory_info().rss / 2**20))
                await asyncio.sleep(0.05)

    t0 = time.perf_counter()
    poll = asyncio.create_task(poller())
    await asyncio.gather(*(client(k) for k in range(CLIENTS)))
    elapsed = time.perf_counter() - t0
    done.set()
    await poll
    return {"results": results, "latencies": latencies, "elapsed": elapsed, "rss": rss}


def test_concurrent_clients_get_their_own_images_and_nothing_grows(live):
    url = live(queue=CLIENTS * 2)
    me = psutil.Process()  # the server runs in this process (uvicorn in a thread)
    with httpx.Client(base_url=url, timeout=120) as c:
        alone = [pixels_of(c.post(f"{A}/txt2img", json=b).json()) for b in BODIES]
        for _ in range(2):  # warm: every code path has run before the first measure
            c.post(f"{A}/txt2img", json=BODIES[0])
    rss0, fds0 = me.memory_info().rss, me.num_fds()
    out = asyncio.run(load(url, alone))
    results = out["results"]
    assert len(results) == REQUESTS
    assert all(status == 200 for _, status, _ in results), [s for _, s, _ in results if s != 200]
    wrong = [i for i, _, same in results if not same]
    assert not wrong, f"{len(wrong)} answers differ from the same request made alone"
    lat = out["latencies"]
    assert max(lat["health"]) < 2 and max(lat["progress"]) < 2  # generous: the machine is shared
    wait_until(lambda: me.num_fds() <= fds0 + 4, timeout=20)  # keep-alive sockets close with their clients
    rss1 = me.memory_info().rss
    figures("load.json", {
        "clients": CLIENTS, "requests": REQUESTS, "elapsed_s": round(out["elapsed"], 1),
        "requests_per_min": round(REQUESTS / out["elapsed"] * 60, 1),
        "health_ms": {"n": len(lat["health"]), "p50": round(statistics.median(lat["health"]) * 1000, 1),
                      "p99": round(percentile(lat["health"], 0.99) * 1000, 1),
                      "max": round(max(lat["health"]) * 1000, 1)},
        "progress_ms": {"n": len(lat["progress"]), "p50": round(statistics.median(lat["progress"]) * 1000, 1),
                        "p99": round(percentile(lat["progress"], 0.99) * 1000, 1),
                        "max": round(max(lat["progress"]) * 1000, 1)},
        "rss_before_mib": round(rss0 / 2**20, 1), "rss_after_mib": round(rss1 / 2**20, 1),
        "rss_mib_after_n_requests": {n: round(max(m for k, m in out["rss"] if k <= n), 1)
                                     for n in sorted({REQUESTS // 10, REQUESTS // 2, REQUESTS})},
        "fds_before": fds0, "fds_after": me.num_fds(), "wrong": len(wrong)})
    assert rss1 - rss0 < 100 * 2**20, f"RSS grew {(rss1 - rss0) / 2**20:.0f} MiB over {REQUESTS} requests"


def test_a_full_queue_answers_503_at_once_and_clients_that_retry_get_their_images(live):
    """One long job runs, the queue holds 2: of 8 clients at once, 2 wait and 6 get 503 + Retry-After within a
    second or two (never a hang); each retries after Retry-After (at most 5 tries) and gets the image it
    would get alone."""
    url = live(queue=2, limits=ROOMY)
    with httpx.Client(base_url=url, timeout=60) as c:
        alone = [pixels_of(c.post(f"{A}/txt2img", json=b).json()) for b in BODIES]
        c.post("/t2i/v1/jobs", json={**LONG, "force_task_id": "blocker"})
        wait_until(lambda: c.get("/t2i/v1/jobs/blocker").json()["step"] >= 2)

    first: dict[int, tuple[int, float, str | None]] = {}
    final: dict[int, list[str]] = {}

    async def client(k: int, gate: asyncio.Event):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            for attempt in range(5):
                t0 = time.perf_counter()
                r = await c.post(f"{A}/txt2img", json=BODIES[k])
                if attempt == 0:
                    first[k] = (r.status_code, time.perf_counter() - t0, r.headers.get("retry-after"))
                if r.status_code == 200:
                    final[k] = pixels_of(r.json())
                    return
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
                await gate.wait()  # the blocker is stopped once all first answers are in
                await asyncio.sleep(min(int(r.headers["retry-after"]), 5))

    async def main():
        gate = asyncio.Event()
        tasks = [asyncio.create_task(client(k, gate)) for k in range(CLIENTS)]
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            for _ in range(200):  # bounded wait for the 6 refusals
                if sum(1 for s, _, _ in first.values() if s == 503) >= CLIENTS - 2:
                    break
                await asyncio.sleep(0.05)
            assert (await c.get("/t2i/v1/health")).json()["queued"] == 2
            await c.post(f"{A}/interrupt")
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)

    asyncio.run(main())
    refusals = [(s, t, ra) for s, t, ra in first.values() if s == 503]
    assert len(refusals) == CLIENTS - 2
    assert all(t < 5 and ra is not None for _, t, ra in refusals)  # at once, never a hang
    assert final == {k: alone[k] for k in range(CLIENTS)}
    figures("queue.json", {"clients": CLIENTS, "queue": 2, "refused_503": len(refusals),
                           "refusal_ms_max": round(max(t for _, t, _ in refusals) * 1000, 1),
                           "retry_after": sorted(int(ra) for _, _, ra in refusals), "served_in_the_end": len(final)})
