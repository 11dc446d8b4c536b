"""Where the time of one unCLIP generation goes, aipaint against diffusers: every network call is timed.

Builds the same random-weight Karlo-size models as ``benchmarks/families.py --families unclip`` (about 13 GB of
memory), then runs 3 prior + 3 decoder + 3 super-resolution steps on each side, two rounds, and prints the wall
time, the time spent inside the networks, and each network's calls with their input shapes. Equal calls and
nothing outside them mean a difference in ``families.py`` is the machine, not aipaint's pipeline.

    python benchmarks/unclip_calls.py [--threads 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import families  # noqa: E402

CALLS: list[tuple[str, tuple, float]] = []


def timed(cls: type) -> None:
    """Wrap ``cls.forward`` so every call records (class, input shapes, seconds) in CALLS."""
    forward = cls.forward

    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        out = forward(self, *args, **kwargs)
        shapes = tuple(tuple(x.shape) for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
        CALLS.append((cls.__name__, shapes, time.perf_counter() - started))
        return out

    cls.forward = wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection

    for cls in (PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPTextProjModel, CLIPTextModelWithProjection):
        timed(cls)
    sides = {}
    # families.bench_unclip builds both pipelines and hands its two step functions to per_step_in_turns
    families.per_step_in_turns = lambda ours, theirs, n: sides.update(aipaint=ours, diffusers=theirs) or {
        "aipaint": 0.0, "diffusers": 0.0}
    with torch.inference_mode():
        families.bench_unclip(256)
        for round_ in range(a.rounds):
            for side, run in sides.items():
                CALLS.clear()
                started = time.perf_counter()
                run(3)
                wall = time.perf_counter() - started
                inside = sum(seconds for _, _, seconds in CALLS)
                print(f"round {round_} {side}: wall {wall:.2f} s, in networks {inside:.2f} s, outside {wall - inside:.2f} s")
                per: dict[tuple[str, tuple], tuple[int, float]] = {}
                for name, shapes, seconds in CALLS:
                    n, total = per.get((name, shapes), (0, 0.0))
                    per[(name, shapes)] = (n + 1, total + seconds)
                for (name, shapes), (n, total) in per.items():
                    print(f"    {name:28s} x{n} {total:7.2f} s  {shapes}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
