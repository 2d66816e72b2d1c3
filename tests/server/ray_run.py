"""Run `t2i serve` as a Ray Serve deployment on this machine and answer some requests (used by
test_server_ray.py, inside a private network namespace: Ray's own servers listen on every address).

    python tests/server/ray_run.py MODEL REQUESTS.json ANSWERS.json
"""

from __future__ import annotations

import json
import socket
import sys
import time


def main(model: str, requests_file: str, answers_file: str) -> None:
    import httpx
    import ray
    from ray import serve

    from t2i.server import ServerConfig
    from t2i.server.ray_serve import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(ServerConfig(model=model, device="cpu")), route_prefix="/")
        started = time.time() - t0
        answers = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for route, body in json.load(open(requests_file)):
                r = c.post(route, json=body)
                answers.append({"status": r.status_code, "body": r.json()})
            health = c.get("/t2i/v1/health").json()
        json.dump({"answers": answers, "health": health, "started_s": round(started, 1),
                   "total_s": round(time.time() - t0, 1)}, open(answers_file, "w"))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
