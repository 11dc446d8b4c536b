"""Adherence against CFG scale for plain CFG, APG, CFG-Zero* and dynamic thresholding on the
embedded model (the guidance plugin, ``plugins/guidance``).

    python benchmarks/guidance.py [--n 16] [--threads 1]

Captions from seed 4000 (disjoint from the main benchmark's), caption ``i`` drawn with seed
4000 + i; the card's defaults otherwise (20 steps, DPM++ 2M, guidance rescale 0.7).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_model import captions, score  # noqa: E402

METHODS = {
    "CFG": None,
    "APG eta 0": {"apg": {"eta": 0.0}},
    "APG eta 0, r 5, beta -0.5": {"apg": {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}},
    "CFG-Zero*": {"cfg_zero_star": {}},
    "DynThresh mimic 3, p 0.995": {"dynamic_thresholding": {"mimic_scale": 3.0, "percentile": 0.995}},
}
SCALES = (3, 7, 12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import aipaint

    pipe = aipaint.load()
    caps = captions(a.n, "train", seed=4000)
    print(f"model: shapes-tiny; {a.n} captions (seed 4000); adherence score (all correct) by CFG scale")
    print(f"{'method':<28}" + "".join(f"{'CFG ' + str(s):>18}" for s in SCALES), flush=True)
    for name, options in METHODS.items():
        cells = []
        for cfg in SCALES:
            r = score(pipe, caps, seed=4000, cfg_scale=cfg, options=options)
            cells.append(f"{r['score']:.1%} ({r['all_correct']:.0%})")
        print(f"{name:<28}" + "".join(f"{c:>18}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
