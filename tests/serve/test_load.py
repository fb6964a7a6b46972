"""Load: 32 concurrent clients x 25 requests, mixing 8 adapters and the base, over real HTTP."""

from __future__ import annotations

import random
import statistics
import threading
import time

import pytest
from conftest import ADAPTER_NAMES
from serve.live import start_server
from serve.test_app import post

CLIENTS, REQUESTS = 32, 25


@pytest.fixture(scope="module")
def loaded_server(tiny_path, adapter_dirs):
    server = start_server(tiny_path, adapter_dirs, max_loaded_adapters=8)
    yield server
    server.close()


def test_32_clients_x_25_requests_mixing_8_adapters_get_no_5xx(loaded_server, tiny_path, capsys):
    models = [*ADAPTER_NAMES, str(tiny_path)]
    results: list[tuple[int, float, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for i in range(REQUESTS):
            body = {"model": rng.choice(models), "max_tokens": rng.randint(2, 16),
                    "messages": [{"role": "user", "content": f"client {seed} request {i}: " + "tell me " * rng.randint(1, 12)}],
                    "temperature": rng.choice([0.0, 0.7]), "seed": i, "stream": False}
            start = time.perf_counter()
            code, answer = post(loaded_server.url, body)
            with lock:
                results.append((code, time.perf_counter() - start, answer.get("usage", {}).get("completion_tokens", 0)))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - started
    codes = [code for code, _, _ in results]
    latencies = sorted(latency for _, latency, _ in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * (len(latencies) - 1))]
    with capsys.disabled():
        print(f"\nload: {len(results)} requests from {CLIENTS} clients over 8 adapters + base in {wall:.1f} s; "
              f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; "
              f"{sum(t for _, _, t in results) / wall:.0f} generated tokens/s; "
              f"{loaded_server.served.scheduler.steps} decode steps")
    assert len(results) == CLIENTS * REQUESTS
    assert not [c for c in codes if c >= 500], "no 5xx"
    assert set(codes) == {200}
    assert len(loaded_server.served.pool.loaded) == 8
