"""Measure `t2i serve`: its overhead over a warm Python process, its throughput, its memory.

    python -m t2i.server.bench [--pairs 10] [--clients 8] [--per-client 5] [--memory 500] [--threads 1]

1. Latency: a 20-step 64x64 image of the bundled model through the API (a `t2i serve` process on
   127.0.0.1, one request at a time) against the same image made in this process by a warm
   `Text2Image` (pipe() alone, and pipe() plus the PNG with metadata that the API returns);
   interleaved pairs, medians. The two must give the same pixels (checked).
2. Throughput: requests per minute with `--clients` concurrent clients, each sending `--per-client`
   of the same 20-step requests (new seeds).
3. Memory: the server's RSS after 10 and after `--memory` requests of a small job (2 steps, 64x64).

Both sides run torch with `--threads` intra-op threads (the server through OMP_NUM_THREADS).
Prints a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

REQUEST = {"prompt": "a red circle to the left of a blue square", "steps": 20, "width": 64, "height": 64}
SMALL = {"prompt": "a green star", "steps": 2, "width": 64, "height": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, "-m", "t2i.cli", "serve", "--port", str(port), "--device", "cpu",
                             "--queue", "64"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(client, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if client.get("/t2i/v1/health").json().get("loaded"):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not become ready")


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=5)
    ap.add_argument("--memory", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import httpx
    import numpy as np
    import torch
    from PIL import Image

    from t2i.pipelines import Text2Image
    from t2i.jobs import png_bytes

    torch.set_num_threads(args.threads)
    port = _free_port()
    server = start_server(args.threads, port)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        wait_ready(client)
        pipe = Text2Image.from_pretrained(device="cpu")

        # 1. latency, interleaved
        api_s, pipe_s, png_s = [], [], []
        for i in range(args.pairs + 1):  # the first pair warms both up and is not counted
            seed = 1000 + i
            t0 = time.perf_counter()
            r = client.post("/sdapi/v1/txt2img", json={**REQUEST, "seed": seed})
            t_api = time.perf_counter() - t0
            r.raise_for_status()
            t0 = time.perf_counter()
            result = pipe(REQUEST["prompt"], steps=20, width=64, height=64, seed=seed, progress=False)
            t_pipe = time.perf_counter() - t0
            png = png_bytes(result.images[0], result.settings[0])
            t_png = time.perf_counter() - t0
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
            if not np.array_equal(served, np.asarray(result.images[0].convert("RGB"))):
                raise RuntimeError(f"seed {seed}: the API's pixels differ from the warm process's")
            del png
            if i:
                api_s.append(t_api), pipe_s.append(t_pipe), png_s.append(t_png)
        m_api, m_pipe, m_png = (statistics.median(x) for x in (api_s, pipe_s, png_s))

        # 2. throughput with concurrent clients
        def one_client(k: int) -> int:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
                for j in range(args.per_client):
                    c.post("/sdapi/v1/txt2img", json={**REQUEST, "seed": 5000 + k * 100 + j}).raise_for_status()
            return args.per_client

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            done = sum(pool.map(one_client, range(args.clients)))
        elapsed = time.perf_counter() - t0
        rpm = done / elapsed * 60

        # 3. memory
        for j in range(10):
            client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": j}).raise_for_status()
        rss_10 = rss(server.pid)
        t0 = time.perf_counter()
        for j in range(10, args.memory):
            client.post("/sdapi/v1/txt2img", json={**SMALL, "seed": j}).raise_for_status()
        rss_n = rss(server.pid)
        memory_s = time.perf_counter() - t0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    mib = 2**20
    print("| measure | value |\n|---|---|")
    print(f"| 20-step 64x64, warm process, pipe() alone (median of {args.pairs}) | {m_pipe * 1000:.0f} ms |")
    print(f"| same, pipe() + PNG with metadata | {m_png * 1000:.0f} ms |")
    print(f"| same through the API (HTTP, queue, PNG, base64) | {m_api * 1000:.0f} ms |")
    print(f"| API overhead over pipe() alone | {(m_api / m_pipe - 1) * 100:+.1f} % |")
    print(f"| API overhead over pipe() + PNG | {(m_api / m_png - 1) * 100:+.1f} % |")
    print(f"| pairs (API, pipe) in ms | {', '.join(f'{a * 1000:.0f}/{p * 1000:.0f}' for a, p in zip(api_s, pipe_s))} |")
    print(f"| {args.clients} concurrent clients x {args.per_client} requests | {done} in {elapsed:.1f} s = "
          f"{rpm:.1f} requests/min (one worker: 60 s / median API latency = {60 / m_api:.1f}) |")
    print(f"| server RSS after 10 small requests (2 steps, 64x64) | {rss_10 / mib:.1f} MiB |")
    print(f"| server RSS after {args.memory} small requests | {rss_n / mib:.1f} MiB "
          f"({(rss_n - rss_10) / mib:+.1f} MiB; {args.memory - 10} requests in {memory_s:.0f} s) |")
    print(f"\npython {platform.python_version()}, torch {torch.__version__}, threads {args.threads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
