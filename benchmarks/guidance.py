"""Adherence against CFG scale for plain CFG, APG, CFG-Zero*, dynamic thresholding and PAG on the
embedded model (the guidance plugin, ``plugins/guidance``).

    python benchmarks/guidance.py [--n 16] [--threads 1] [--only PAG]

``--only`` runs the methods whose names are one of its comma-separated words or start with
one followed by a space (``--only CFG,PAG``: the CFG row and the PAG rows).

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
    "PAG 3 (mid)": {"pag": {"scale": 3.0}},
    "PAG 1.5 (mid)": {"pag": {"scale": 1.5}},
    "PAG 3 (down_blocks.0 + up_blocks.2)": {"pag": {"scale": 3.0, "layers": "down_blocks.0,up_blocks.2"}},
    "PAG 6 (down_blocks.0 + up_blocks.2)": {"pag": {"scale": 6.0, "layers": "down_blocks.0,up_blocks.2"}},
    # CFG++ is a sampler, meant for low CFG scales: run with --scales 1,1.5,2 (Euler as its baseline).
    "Euler": {"sampler": "Euler"},
    "Euler CFG++": {"sampler": "Euler CFG++"},
}
SCALES = (3, 7, 12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scales", default=",".join(str(x) for x in SCALES), help="CFG scales (comma-separated)")
    ap.add_argument("--only", default="", help="run only these methods (comma-separated names or first words)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import aipaint

    pipe = aipaint.load()
    caps = captions(a.n, "train", seed=4000)
    print(f"model: shapes-tiny; {a.n} captions (seed 4000); adherence score (all correct) by CFG scale")
    scales = [float(x) for x in a.scales.split(",")]
    print(f"{'method':<36}" + "".join(f"{'CFG ' + format(s, 'g'):>18}" for s in scales), flush=True)
    for name, options in METHODS.items():
        wanted = [w.strip() for w in a.only.split(",") if w.strip()]
        if wanted and not any(name == w or name.startswith(w + " ") for w in wanted):
            continue
        cells = []
        params = dict(options or {})
        extra = {"sampler": params.pop("sampler")} if "sampler" in params else {}
        for cfg in scales:
            r = score(pipe, caps, seed=4000, cfg_scale=cfg, options=params or None, **extra)
            cells.append(f"{r['score']:.1%} ({r['all_correct']:.0%})")
        print(f"{name:<36}" + "".join(f"{c:>18}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
