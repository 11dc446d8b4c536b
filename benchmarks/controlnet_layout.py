"""Does the layout ControlNet put objects where the control image says?

    python benchmarks/controlnet_layout.py [--cases 120] [--pairs 40] [--record]

On the embedded model ``shapes-tiny`` with ``shapes-tiny-controlnet-layout``: random
held-out scenes (one object; ``--pairs`` two-object scenes too), each generated from a
prompt *without* positions ("a big red circle, on a white background") with the
ControlNet fed the scene's render through the ``canny`` preprocessor, and again without
the ControlNet (same seed). ``aipaint_plugins.shapes_world.evaluate.read_scene`` reads where the objects
ended up. Prints the accuracy per position with Wilson 95% intervals, the time per image
with and without, and (``--record``) writes the numbers into the zoo card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=120, help="one-object scenes")
    ap.add_argument("--pairs", type=int, default=40, help="two-object scenes")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="write the results into zoo/cards/shapes-tiny-controlnet-layout.json")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from aipaint_plugins.shapes_world.controlnet_layout import MODEL_ID, evaluate, layout_cases

    import aipaint

    pipe = aipaint.load()
    params = {"steps": a.steps} if a.steps else {}
    groups = {"one object": layout_cases(a.cases, a.seed, n_objects=1)}
    if a.pairs:
        groups["two objects"] = layout_cases(a.pairs, a.seed + 1, n_objects=2)
    pipe.txt2img("warm-up", width=32, height=32, steps=2)
    summary: dict[str, dict] = {}
    print(f"{'scenes':<12} {'positions':<14} {'n':>4} {'with ControlNet':>22} {'without':>22}")
    timing = {}
    for group, scenes in groups.items():
        outcome = {}
        for use in (True, False):
            started = time.perf_counter()
            outcome[use] = evaluate(pipe, scenes, use_controlnet=use, seed=a.seed, **params)
            timing.setdefault(use, []).append((time.perf_counter() - started) / len(scenes))
        rows = defaultdict(lambda: {True: [], False: []})
        for use in (True, False):
            for result in outcome[use]:
                rows["+".join(sorted(result.wanted))][use].append(result.ok)
                rows["all"][use].append(result.ok)
        for name in sorted(rows, key=lambda r: (r == "all", r)):
            cells = []
            for use in (True, False):
                oks = rows[name][use]
                lo, hi = wilson(sum(oks), len(oks))
                cells.append(f"{sum(oks) / len(oks):6.1%} [{lo:5.1%}, {hi:5.1%}]")
            print(f"{group:<12} {name:<14} {len(rows[name][True]):>4} {cells[0]:>22} {cells[1]:>22}")
        summary[group] = {
            "n": len(scenes),
            "accuracy_with_controlnet": sum(r.ok for r in outcome[True]) / len(scenes),
            "accuracy_without": sum(r.ok for r in outcome[False]) / len(scenes),
        }
    with_s, without_s = (sum(timing[u]) / len(timing[u]) for u in (True, False))
    print(f"\ntime per image: {with_s:.3f} s with the ControlNet, {without_s:.3f} s without "
          f"(ratio {with_s / without_s:.2f}x; {a.threads} thread(s), steps {a.steps or pipe.model.defaults.steps})")
    if a.record:
        from aipaint.models.zoo import zoo_root

        card_path = zoo_root() / "cards" / f"{MODEL_ID}.json"
        card = json.loads(card_path.read_text())
        card["evaluation"] = {
            "benchmark": "python benchmarks/controlnet_layout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "what": "object(s) found by read_scene at the control image's position(s); prompt without positions; "
                    "same seeds with and without the ControlNet",
            "seed": a.seed,
            "settings": {"steps": a.steps or pipe.model.defaults.steps, "sampler": pipe.model.defaults.sampler,
                         "cfg_scale": pipe.model.defaults.cfg_scale},
            **summary,
            "seconds_per_image": {"with_controlnet": round(with_s, 3), "without": round(without_s, 3)},
            "date": time.strftime("%Y-%m-%d"),
            **({"previous": card["evaluation"]["previous"]} if isinstance(card.get("evaluation"), dict)
               and "previous" in card["evaluation"] else {}),
        }
        tmp = card_path.with_name(f".{card_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        os.replace(tmp, card_path)
        print(f"recorded in {Path(card_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
