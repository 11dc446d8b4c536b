"""The HTTP server under load: N concurrent txt2img requests on loopback, against the Python API.

Starts ``aipaint serve`` (its own process) on a free 127.0.0.1 port with the embedded model, then sends ``--requests`` txt2img bodies from as many client threads, each
with its own seed. It checks that every request is answered 200, that each answer carries its
own seed (none lost, none duplicated or swapped), and that they finished in the order they were
sent (the server runs one at a time, in arrival order). It prints the latency p50/p95 (from
sending to the answer), the throughput, and the per-image cost of HTTP: wall time per image with
the queue never idle, minus the median time of the same generation through ``Pipeline.generate``,
both measured in this run.

Usage: python benchmarks/serve_load.py [--requests 16] [--steps 8] [--size 32] [--spacing 0.05] [--timeout 300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

import aipaint


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--spacing", type=float, default=0.05, help="seconds between the clients' sends")
    parser.add_argument("--timeout", type=float, default=300.0, help="the most seconds the whole run may take")
    args = parser.parse_args()

    pipe = aipaint.load()
    body = {"prompt": "a big red circle on the left, on a white background", "steps": args.steps,
            "width": args.size, "height": args.size, "sampler_name": "Euler"}
    request = aipaint.GenerationRequest(prompt=body["prompt"], steps=args.steps, width=args.size, height=args.size,
                                        sampler="Euler", seed=0)
    pipe.generate(request)  # warm up
    direct: list[float] = []

    def measure_direct() -> None:  # before and after the HTTP run, so that a busy spell elsewhere shows in both
        for seed in range(5):
            start = time.perf_counter()
            pipe.generate(dataclasses.replace(request, seed=seed))
            direct.append(time.perf_counter() - start)

    measure_direct()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The server in its own process, as it runs in use: the clients here do not share its interpreter.
    server = subprocess.Popen([sys.executable, "-m", "aipaint", "serve", "--port", str(port), "--queue-size",
                               str(args.requests + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        per_http = run(args, body, port)
    finally:
        server.terminate()
        server.wait(10)
    measure_direct()
    per_direct = statistics.median(direct)
    print(f"per image: HTTP {per_http * 1000:.1f} ms (wall / images, the queue never idle), Python API "
          f"{per_direct * 1000:.1f} ms (median of {len(direct)}); HTTP overhead "
          f"{1000 * (per_http - per_direct):.1f} ms per image")


def run(args: argparse.Namespace, body: dict, port: int) -> float:
    """Send the requests, print what came back; the seconds per image over the whole run."""
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    deadline = time.perf_counter() + args.timeout
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=1.0)
            break
        except httpx.TransportError:
            if time.perf_counter() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)
    # One client for all threads: a client per request builds an SSL context each time, which delays sends.
    session = httpx.Client(limits=httpx.Limits(max_connections=args.requests + 1))
    session.post(url, json={**body, "seed": 0}, timeout=args.timeout)  # warm up the HTTP path
    answers: dict[int, tuple[int, float, int, float]] = {}
    sent: list[tuple[float, int]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        with lock:
            start = time.perf_counter()
            sent.append((start, seed))
        reply = session.post(url, json={**body, "seed": seed}, timeout=max(1.0, deadline - start))
        seeds = json.loads(reply.json()["info"])["all_seeds"] if reply.status_code == 200 else []
        answers[seed] = (reply.status_code, time.perf_counter() - start, seeds[0] if seeds else -1, start)

    began = time.perf_counter()
    clients = []
    for seed in range(1, args.requests + 1):
        clients.append(threading.Thread(target=client, args=(seed,)))
        clients[-1].start()
        time.sleep(args.spacing)  # a distinct arrival order, so that order kept can be checked
    for c in clients:
        c.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - began

    latencies = [answers[s][1] for s in answers]
    ok = [s for s in answers if answers[s][0] == 200]
    mismatched = [s for s in ok if answers[s][2] != s]
    arrival = [seed for _, seed in sorted(sent)]
    finish = sorted(answers, key=lambda s: answers[s][3] + answers[s][1])
    print(f"{args.requests} concurrent txt2img, {args.size}x{args.size}, {args.steps} steps, embedded model, CPU")
    print(f"answered 200: {len(ok)}/{args.requests}; own seed in each answer: {len(ok) - len(mismatched)}/{len(ok)}; "
          f"lost: {args.requests - len(answers)}")
    moved = sum(a != b for a, b in zip(finish, arrival, strict=False))
    print(f"finished in the order sent ({args.spacing * 1000:.0f} ms apart): {finish == arrival} ({moved} out of place)")
    print(f"latency p50 {percentile(latencies, 0.5):.3f} s, p95 {percentile(latencies, 0.95):.3f} s; "
          f"throughput {len(ok) / wall:.2f} images/s over {wall:.2f} s")
    return wall / len(ok) if ok else float("nan")


if __name__ == "__main__":
    main()
