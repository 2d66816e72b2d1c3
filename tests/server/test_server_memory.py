"""Memory over 500 requests, separated from the allocator's noise: the Python heap (tracemalloc) and the RSS
after glibc's malloc_trim, sampled every 50 requests after a warm-up. Slow (about 7 minutes on 2 cores):
`pytest -m slow tests/server/test_server_memory.py -s` prints the figures docs/guarantees.md quotes."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tracemalloc

import psutil
import pytest

from srv import FAST

pytestmark = pytest.mark.slow

WARM, REQUESTS = 50, 500


def test_memory_is_flat_over_500_requests(make_client):
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(libc, "malloc_trim", None)  # glibc: give freed arenas back, so RSS shows what is held
    me = psutil.Process()
    c = make_client()
    samples = {}  # requests answered -> (python heap bytes, RSS bytes)

    def sample(n: int) -> None:
        gc.collect()
        if trim is not None:
            trim(0)
        samples[n] = (tracemalloc.get_traced_memory()[0], me.memory_info().rss)

    for i in range(WARM):
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": i, **FAST}).status_code == 200
    tracemalloc.start()
    try:
        sample(WARM)
        fds = me.num_fds()
        for i in range(WARM, REQUESTS):
            assert c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": i, **FAST}).status_code == 200
            if (i + 1) % 50 == 0:
                sample(i + 1)
    finally:
        tracemalloc.stop()
    for n, (heap, rss) in samples.items():
        print(f"{n:4d} requests: python heap +{heap / 2**20:.2f} MiB, RSS {rss / 2**20:.1f} MiB")
    half = REQUESTS // 2
    heap_growth = samples[REQUESTS][0] - samples[half][0]
    rss_growth = samples[REQUESTS][1] - samples[half][1]
    assert heap_growth < 0.25 * 2**20, f"the Python heap grew {heap_growth / 2**20:.2f} MiB in the second half"
    assert rss_growth < 8 * 2**20, f"RSS grew {rss_growth / 2**20:.1f} MiB in the second half"
    assert me.num_fds() <= fds + 4
