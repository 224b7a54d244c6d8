"""Throughput of the served endpoint against a plain loop in one process, and what batching buys.

Clients send the same requests (the built-in model, one image each, prompts and seeds varied) from
several threads to a server with one replica; each max batch size is a fresh server on a local Ray
cluster. The plain loop runs the same requests one by one through a RequestRunner with one torch
thread, as a replica has (one CPU). The served path's overhead per image is the difference of the
per-image times, against the loop's better run of two (one before the servers, one after); the first
round of requests warms the replica and is not counted.
Run: python bench/serve_throughput.py [--requests 48] [--clients 8] [--size 64] [--steps 8] [--batch-sizes 1 4 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from diffblocks.scale import GenerationRequest, RequestRunner, serve

COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "triangle", "cross"]


def bodies(count: int, size: int, steps: int) -> list[dict[str, object]]:
    return [
        {"prompt": f"a {COLORS[k % 4]} {SHAPES[k // 4 % 4]}", "seed": k, "height": size, "width": size, "num_inference_steps": steps}
        for k in range(count)
    ]


def post(url: str, body: dict[str, object]) -> float:
    """Seconds from sending the request to the last byte of its PNG."""
    started = time.perf_counter()
    request = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
        assert answer.status == 200
    return time.perf_counter() - started


def served(batch_size: int, work: list[dict[str, object]], clients: int) -> tuple[float, float]:
    """Images per second and the median latency in seconds, with ``clients`` requests in flight."""
    with serve(port=0, max_batch_size=batch_size, batch_wait_timeout_s=0.05, max_ongoing_requests=max(2 * batch_size, clients)) as server:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda body: post(server.url, body), work[:clients]))  # warm-up
            started = time.perf_counter()
            latencies = list(pool.map(lambda body: post(server.url, body), work))
            elapsed = time.perf_counter() - started
    return len(work) / elapsed, statistics.median(latencies)


def plain(work: list[dict[str, object]]) -> float:
    """Images per second of the same requests one by one in this process, on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = RequestRunner.load(device="cpu")
        requests = [GenerationRequest.model_validate(body) for body in work]
        runner.images(requests[0])  # warm-up
        started = time.perf_counter()
        for request in requests:
            runner.images(request)
        return len(requests) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    work = bodies(args.requests, args.size, args.steps)

    before = plain(work)  # before and after the servers: a busy machine shows as a gap between the two
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        rows = [(batch, *served(batch, work, args.clients)) for batch in args.batch_sizes]
    finally:
        ray.shutdown()
    after = plain(work)
    loop = max(before, after)
    print(f"{args.requests} requests, {args.clients} clients, {args.size}x{args.size}, {args.steps} steps, 1 replica (1 CPU)")
    print(f"plain loop, one process: {before:.2f} images/s before the servers, {after:.2f} after ({1000 / loop:.0f} ms per image at best)")
    for batch, rate, latency in rows:
        overhead = 1000 / rate - 1000 / loop
        print(f"served, max batch {batch}: {rate:.2f} images/s, median latency {latency:.2f} s, {overhead:+.0f} ms per image vs the loop")


if __name__ == "__main__":
    main()
