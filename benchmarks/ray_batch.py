"""The prompts-file batch on Ray against the local runner, on the same request file, in one run.

Writes a JSON-lines request file of ``--requests`` txt2img requests (the embedded 32x32 model, fixed
seeds), runs it with the local batch (``aipaint.workflows.batch``, the model already loaded), then
with ``ray_batch`` on 1 worker and on ``--workers`` workers (a Ray started here for the run, or
``--address``'s cluster). For each it prints the wall time, the time to the first image (Ray: starting
the workers and loading their models), the steady throughput (images per second from the first image
to the last) and, for Ray, the per-image overhead: the steady wall time per image with one worker
minus the generation time the worker measured for it (dispatch, pickling, the trip back, the
manifest). It checks that every run made the same files, pixel for pixel.

Usage: python benchmarks/ray_batch.py [--requests 24] [--steps 8] [--workers 2] [--num-cpus 0.5] [--address ADDR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import aipaint
from aipaint.api.request import GenerationRequest
from aipaint.workflows import batch
from aipaint.workflows.ray_batch import ray_batch


def write_requests(path: Path, count: int) -> Path:
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    lines = [{"prompt": f"a big {colours[i % 4]} {shapes[i % 3]} on the left, on a white background", "seed": i}
             for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


class Clock:
    """Times a batch: its start, and when each image came (from the progress callback)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.done: list[float] = []
        self.worker_seconds: list[float] = []

    def __call__(self, event) -> None:
        self.done.append(time.perf_counter())
        if event.status == "generated":
            self.worker_seconds.append(event.seconds)

    def summary(self) -> dict[str, float]:
        wall = self.done[-1] - self.started
        steady = (self.done[-1] - self.done[0]) / max(1, len(self.done) - 1)
        return {"wall": wall, "first": self.done[0] - self.started, "steady_per_image": steady,
                "throughput": 1 / steady if steady else float("inf"), "worker_seconds": statistics.mean(self.worker_seconds)}


def same_images(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        np.array_equal(np.asarray(Image.open(a / n)), np.asarray(Image.open(b / n))) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per Ray worker")
    parser.add_argument("--address", help="an existing Ray cluster (default: a Ray started here for the run)")
    args = parser.parse_args()

    import ray

    base = GenerationRequest("", steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        requests = write_requests(root / "requests.jsonl", args.requests)
        pipe = aipaint.load()
        pipe.generate(GenerationRequest("warm up", steps=args.steps))
        rows = []
        clock = Clock()
        batch(pipe, requests, root / "local", base=base, on_progress=clock)
        rows.append(("local batch", clock.summary()))
        ray.init(address=args.address, include_dashboard=False, logging_level="WARNING",
                 **({} if args.address else {"num_cpus": max(1, round(args.workers * args.num_cpus)),
                                             "object_store_memory": 200 * 2**20}))
        try:
            for workers in sorted({1, args.workers}):
                clock = Clock()
                out = root / f"ray-{workers}"
                ray_batch(requests, out, base=base, workers=workers, num_cpus=args.num_cpus, pipe=pipe,
                          on_progress=clock)
                rows.append((f"ray, {workers} worker{'s' if workers > 1 else ''}", clock.summary()))
                if not same_images(root / "local", out):
                    sys.exit(f"the Ray run with {workers} workers made other files than the local batch")
        finally:
            ray.shutdown()

    local = rows[0][1]
    print(f"{args.requests} requests, {args.steps} steps, 32x32 embedded model; Ray workers {args.num_cpus:g} CPU each")
    print(f"{'runner':<18}{'wall s':>9}{'first image s':>15}{'images/s':>10}{'vs local':>10}")
    for name, row in rows:
        print(f"{name:<18}{row['wall']:>9.2f}{row['first']:>15.2f}{row['throughput']:>10.2f}"
              f"{row['throughput'] / local['throughput']:>10.2f}")
    one = rows[1][1]
    print(f"per-image overhead of the Ray path, 1 worker, steady: "
          f"{1000 * (one['steady_per_image'] - one['worker_seconds']):+.1f} ms against the worker's own time per job "
          f"({1000 * one['worker_seconds']:.1f} ms), {1000 * (one['steady_per_image'] - local['steady_per_image']):+.1f} ms "
          f"against the local batch ({1000 * local['steady_per_image']:.1f} ms per image)")
    print(f"fixed cost of the Ray path: the first image after {one['first']:.1f} s (worker processes start, import "
          f"torch, load the model), i.e. {1000 * (one['wall'] - local['wall']) / args.requests:.0f} ms per image "
          f"over this {args.requests}-request batch")
    print("every run made the same files, pixel for pixel")


if __name__ == "__main__":
    main()
