"""Where does the embedded model's adherence peak with CFG, and does the sampler or Skip Early
CFG move the peak? A check on captions disjoint from the main benchmark's
(``benchmarks/embedded_model.py`` uses caption seeds 1000 and 2000; this uses 3000).

    python benchmarks/embedded_cfg_peak.py [--n 80] [--threads 2] [--model PATH]

Prints, for each sampler, adherence at CFG 1, 3, 7 and 12 (with the per-attribute split),
then CFG 7 with Skip Early CFG 0, 0.2 and 0.4 and the time per image (generation plus the
evaluator). ``--model`` scores another trained copy (e.g. a ``--resume`` run's output)
with the embedded model's card defaults (32x32, guidance rescale 0.7, emphasis none).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_model import captions, embedded_pipe, score  # noqa: E402


def line(label: str, r: dict) -> str:
    return (f"{label}: {r['score']:.1%} (shape {r['shape_acc']:.1%}, colour {r['colour_acc']:.1%}, "
            f"size {r['size_acc']:.1%}, all correct {r['all_correct']:.1%})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="another trained copy of the embedded model (default: the embedded model)")
    ap.add_argument("--samplers", default="DPM++ 2M;Euler a;DPM++ 2M SDE", help="';'-separated sampler names")
    ap.add_argument("--cfg", default="1;3;7;12", help="';'-separated CFG scales of the sweep")
    ap.add_argument("--skip-early", default="0;0.2;0.4", help="';'-separated Skip Early CFG values at CFG 7 "
                                                               "('' for none)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = embedded_pipe(a.model)  # the card's defaults stay; only the weights are the other copy's
    caps = captions(a.n, "train", seed=3000)
    print(f"model: {a.model or pipe.model.name}; {a.n} captions (seed 3000), 20 steps, guidance rescale "
          f"{pipe.model.defaults.guidance_rescale}", flush=True)
    for sampler in a.samplers.split(";"):
        for cfg in (float(v) for v in a.cfg.split(";")):
            print(line(f"{sampler:<12} CFG {cfg:>2g}", score(pipe, caps, seed=3000, cfg_scale=cfg, sampler=sampler)), flush=True)
    for skip in (float(v) for v in a.skip_early.split(";") if v.strip()):
        start = time.perf_counter()
        r = score(pipe, caps, seed=3000, skip_early_cfg=skip)
        per_image = (time.perf_counter() - start) / len(caps)
        print(line(f"CFG 7, Skip Early CFG {skip}", r) + f", {per_image:.3f} s per image", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
