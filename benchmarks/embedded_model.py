"""Quality and speed of the embedded model (issue: the embedded default model, second generation).

One run prints one table at the end: every row of the issue's target table with its measured value,
the target and pass/FAIL (``not run`` where a flag left the row out). The rows come from:
  * adherence at default settings (20 steps, CFG 7, the card's guidance rescale) on training-distribution
    canonical captions, split by how many objects a caption asks for (one / two), and on held-out
    colour x shape combinations;
  * adherence for a CFG sweep (1, 3, 7, 12) and a steps sweep (5, 10, 20, 30) (not in the table);
  * the time of one 20-step image in a warm process at ``--time-threads`` (2: the issue's target), and of a
    cold `aipaint generate`;
  * the features a user tries (``--feature-n`` pairs each, at default settings unless said):
    free phrasings (aipaint_plugins.shapes_world.scene.free_caption) in arrangements used for training and in
    the held-out ones (colour and background right, every asked attribute right); emphasis ``(colour:1.3)``
    on held-out phrasings (colours kept) and the asked colours' pixel share against ``(colour:0.8)`` on the
    same seed; prompt editing of one object's colour ``[A:B:0.2]`` (B drawn) and ``[A:B:0.9]`` (A drawn);
    img2img of a render towards a prompt that recolours one object, at strengths 0.1 .. 0.9 (mean absolute
    pixel change from the input, layout kept at 0.3, the new colour at 0.8); hires fix x2 (latent upscaler)
    at denoising 0.5 (objects, colours, positions as in the first pass); ``AND`` of two object phrases
    (both objects present); every registered sampler x each schedule type it supports (``--sampler-n``
    pairs per combination, attributes present);
  * the LoRA row: the first table of benchmarks/results/lora_concept.txt (written by
    benchmarks/lora_concept.py, which trains with `aipaint train lora`'s defaults), or, with ``--lora``, the
    same recipe trained and scored here on the model being benchmarked.

Usage: python benchmarks/embedded_model.py [--n 200] [--sweep-n 100] [--threads 2] [--json out.json]
       python benchmarks/embedded_model.py --model PATH --threads 1        (another trained copy, same pairs)
       python benchmarks/embedded_model.py --model PATH --quality-only     (canonical rows and sweeps only)
       python benchmarks/embedded_model.py [--model PATH] --features-only --feature-n 60
       python benchmarks/embedded_model.py --table-only                    (only what the table needs)
       python benchmarks/embedded_model.py --quick --threads 1             (smoke check: the table at tiny n)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
LORA_RESULTS = ROOT / "benchmarks" / "results" / "lora_concept.txt"
IMG2IMG_STRENGTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK = {"n": 8, "sweep_n": 0, "feature_n": 4, "sampler_n": 1, "timing_images": 3}
FULL = {"n": 200, "sweep_n": 100, "feature_n": 60, "sampler_n": 20, "timing_images": 10}


def captions(n: int, split: str, seed: int) -> list[str]:
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    return [random_scene(rng, split).caption for _ in range(n)]


def embedded_pipe(model: str | None = None):
    """The embedded model's pipeline; with ``model`` (another trained copy: a ``--resume`` run's
    output, or a model trained from scratch with another latent) that model, under the embedded
    card's defaults (32x32, guidance rescale 0.7, emphasis none) and its card (LoRA training
    settings), its own scheduler config and latent scale kept."""
    import aipaint

    pipe = aipaint.load()
    if model:
        other = aipaint.load(model)
        other.model.defaults = pipe.model.defaults
        other.model.card = dict(pipe.model.card or {})
        pipe = other
    return pipe


def score_list(pipe, caps: list[str], seed: int, **params) -> list:
    """One adherence score per caption; caption ``i`` is drawn with seed ``seed + i``."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    return [adherence(pipe.txt2img(cap, seed=seed + i, **params).image, cap) for i, cap in enumerate(caps)]


def score(pipe, caps: list[str], seed: int, batch: int = 10, **params) -> dict:
    from aipaint_plugins.shapes_world.evaluate import summarize

    return summarize(score_list(pipe, caps, seed, **params))


def by_objects(scores) -> dict:
    """Summaries of the scores whose caption asks for one object and for two (the evaluator's count)."""
    from aipaint_plugins.shapes_world.evaluate import summarize

    return {"one_object": summarize([s for s in scores if len(s.details["objects"]) == 1]),
            "two_objects": summarize([s for s in scores if len(s.details["objects"]) == 2])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, help=f"(prompt, seed) pairs of canonical captions at default settings "
                                           f"(default {FULL['n']}; held-out combinations: at most 100)")
    ap.add_argument("--sweep-n", type=int,
                    help=f"pairs per point of the CFG and steps sweeps (default {FULL['sweep_n']}; 0: no sweeps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-threads", type=int, default=2,
                    help="threads for the warm-image timing (default 2, the issue's target)")
    ap.add_argument("--json", help="also write the numbers (and the table) here")
    ap.add_argument("--model", help="score another trained copy of the embedded model under its card's defaults "
                                    "(see embedded_pipe)")
    ap.add_argument("--card", help="also record the table in this zoo card's evaluation.targets "
                                   "(zoo/cards/shapes-tiny.json for the shipped model)")
    ap.add_argument("--quality-only", action="store_true", help="adherence and sweeps only, no timings")
    ap.add_argument("--feature-n", type=int, help=f"pairs per feature row (default {FULL['feature_n']}; "
                                                   "0: no feature rows)")
    ap.add_argument("--sampler-n", type=int, help=f"pairs per sampler x schedule combination "
                                                   f"(default {FULL['sampler_n']}; 0: none)")
    ap.add_argument("--features-only", action="store_true", help="only the feature rows")
    ap.add_argument("--table-only", action="store_true",
                    help="only what the table needs: no sweeps, no cold-start timing, no training-phrasing row")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: --table-only with tiny n (" + ", ".join(f"{k} {v}" for k, v in QUICK.items())
                         + "), each overridable")
    ap.add_argument("--lora", action="store_true",
                    help="train the held-out-colour LoRA here (benchmarks/lora_concept.py's recipe, the CLI's "
                         "defaults; a few minutes) instead of reading benchmarks/results/lora_concept.txt")
    a = ap.parse_args(argv)
    sizes = QUICK if a.quick else FULL
    for key in ("n", "sweep_n", "feature_n", "sampler_n"):
        if getattr(a, key) is None:
            setattr(a, key, sizes[key])
        if getattr(a, key) < 0:
            ap.error(f"--{key.replace('_', '-')} must be 0 or more")
    table_only = a.table_only or a.quick
    if table_only:
        a.sweep_n = 0
    torch.set_num_threads(a.threads)
    started = time.perf_counter()

    pipe = embedded_pipe(a.model)
    d = pipe.model.defaults
    name = a.model or f"{pipe.model.name} ({pipe.model.model_hash})"
    print(f"model: {name}; defaults: {d.steps} steps, CFG {d.cfg_scale}, "
          f"{d.sampler}, guidance rescale {d.guidance_rescale}, emphasis {d.emphasis}, {d.width}x{d.height}")
    out: dict = {"model": name, "defaults": d.__dict__,
                 "sizes": {"n": a.n, "sweep_n": a.sweep_n, "feature_n": a.feature_n, "sampler_n": a.sampler_n,
                           "threads": a.threads, "time_threads": a.time_threads}}
    if a.feature_n or a.sampler_n:
        out["features"] = feature_rows(pipe, a.feature_n, sampler_n=a.sampler_n, table_only=table_only)
    if not a.features_only:
        mark = time.perf_counter()
        canonical_rows(pipe, a.n, out)
        out["seconds_canonical"] = time.perf_counter() - mark
        if a.sweep_n:
            mark = time.perf_counter()
            sweeps(pipe, captions(a.n, "train", seed=1000)[: a.sweep_n], out)
            out["seconds_sweeps"] = time.perf_counter() - mark
        if not a.quality_only:
            timings(pipe, captions(max(a.n, sizes["timing_images"] + 1), "train", seed=1000), a.threads, out,
                    time_threads=a.time_threads, images=sizes["timing_images"], cold=not table_only)
    out["lora"] = lora_row(pipe, a.model) if a.lora else lora_from_results(LORA_RESULTS)
    if a.model and not a.lora and out["lora"].get("found"):
        out["lora"]["note"] += "; measured on the model shipped then, not on --model (use --lora)"
    out["seconds"] = time.perf_counter() - started
    out["table"] = build_table(out)
    print()
    print(format_table(out["table"], title=f"{name}: the issue's targets ({out['seconds']:.0f} s; n per row in "
                                                "brackets)"))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    if a.card:
        record_in_card(Path(a.card), out, "python benchmarks/embedded_model.py " + " ".join(argv or sys.argv[1:]))
    return 0


def record_in_card(card: Path, out: dict, command: str) -> None:
    """Write the table into the card's ``evaluation.targets``: each row's measurement, target and verdict."""
    data = json.loads(card.read_text())
    rows = [{key: row[key] for key in ("behaviour", "measured", "target", "pass", "note") if row.get(key) not in ("", None)}
            for row in out["table"]]
    data.setdefault("evaluation", {})["targets"] = {
        "command": command, "model": out["model"], "measured": time.strftime("%Y-%m-%d"),
        "met": sum(row["pass"] is True for row in out["table"]), "rows": rows}
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(card)  # a reader never sees half a card


def canonical_rows(pipe, n: int, out: dict) -> None:
    scores = score_list(pipe, captions(n, "train", seed=1000), seed=1000)
    from aipaint_plugins.shapes_world.evaluate import summarize

    out["train"] = summarize(scores)
    out.update({f"train_{k}": v for k, v in by_objects(scores).items()})
    out["heldout_combo"] = score(pipe, captions(min(n, 100), "heldout_combo", seed=2000), seed=2000)
    for key in ("train", "train_one_object", "train_two_objects", "heldout_combo"):
        r = out[key]
        if not r["n"]:
            print(f"{key:>17}: n=0")
            continue
        print(f"{key:>17}: n={r['n']} attributes present {r['score']:.1%}, all correct {r['all_correct']:.1%} "
              f"(shape {_pct(r['shape_acc'])}, colour {_pct(r['colour_acc'])}, size {_pct(r['size_acc'])}, "
              f"position {_pct(r['position_acc'])}, background {_pct(r['background_acc'])})")


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def sweeps(pipe, sweep_caps: list[str], out: dict) -> None:
    out["cfg_sweep"] = {}
    print("CFG sweep (20 steps):", end="")
    for cfg in (1, 3, 7, 12):
        r = score(pipe, sweep_caps, seed=1000, cfg_scale=cfg)
        out["cfg_sweep"][cfg] = r["score"]
        print(f"  CFG {cfg}: {r['score']:.1%}", end="", flush=True)
    print()
    out["cfg_sweep_no_rescale"] = {}
    print("CFG sweep, guidance rescale 0:", end="")
    for cfg in (1, 3, 7, 12):
        r = score(pipe, sweep_caps, seed=1000, cfg_scale=cfg, guidance_rescale=0.0)
        out["cfg_sweep_no_rescale"][cfg] = r["score"]
        print(f"  CFG {cfg}: {r['score']:.1%}", end="", flush=True)
    print()
    out["steps_sweep"] = {}
    print("steps sweep (CFG 7):", end="")
    for steps in (5, 10, 20, 30):
        r = score(pipe, sweep_caps, seed=1000, steps=steps)
        out["steps_sweep"][steps] = r["score"]
        print(f"  {steps} steps: {r['score']:.1%}", end="", flush=True)
    print()


def scenes(n: int, seed: int, n_objects: int | None = None) -> list:
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    return [random_scene(rng, "train", n_objects=n_objects) for _ in range(n)]


# --------------------------------------------------------------------------- per-image checks
def colour_and_background(score) -> bool:
    """Every asked object's colour and the asked background are right (one image)."""
    objs = score.details["objects"]
    bg = score.details["background"]["ok"]
    return all(o.get("colour", True) for o in objs) and bg is not False


def colours_right(score) -> bool:
    """Every asked object is found in its asked colour (a missing object counts as wrong)."""
    objs = score.details["objects"]
    return bool(objs) and all(o.get("colour", False) for o in objs)


def object_colour_right(score, obj) -> bool:
    """The asked object at ``obj``'s shape and position is found in the colour the caption asks for."""
    for o in score.details["objects"]:
        if o["asked"]["shape"] == obj.shape and o["asked"]["position"] == obj.position:
            return bool(o.get("colour", False))
    raise ValueError(f"the caption asks for no {obj.shape} {obj.position}")


def layout_kept(score) -> bool:
    """Every object of the input is found at its position with its shape, and nothing else is drawn."""
    d = score.details
    return (d["missing_objects"] == 0 and d["extra_objects"] == 0
            and all(o.get("shape", False) and o.get("position", False) for o in d["objects"]))


def both_present(score) -> bool:
    """Each asked object is found with its asked shape and colour."""
    objs = score.details["objects"]
    return bool(objs) and all(o.get("shape", False) and o.get("colour", False) for o in objs)


def same_objects(first, second) -> bool:
    """Two readings show the same objects: shapes, colours and positions (the first has at least one)."""
    def key(reading) -> Counter:
        return Counter((o.shape, o.colour, o.position) for o in reading.objects)

    return bool(first.objects) and key(first) == key(second)


def colour_share(image, colours: Iterable[str]) -> float:
    """Fraction of the pixels whose nearest palette colour (object colours and backgrounds) is one of ``colours``."""
    from aipaint_plugins.shapes_world.scene import BACKGROUNDS, COLOURS

    palette = {**COLOURS, **BACKGROUNDS}
    names = list(palette)
    unknown = set(colours) - set(names)
    if unknown:
        raise ValueError(f"not palette colours: {sorted(unknown)}")
    table = np.asarray([palette[k] for k in names], np.float32)
    pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
    nearest = np.argmin(((pixels[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    return float(np.isin(nearest, [names.index(c) for c in set(colours)]).mean())


def mean_abs_change(image, reference) -> float:
    """Mean absolute RGB difference (0..255) between two images of the same size."""
    a = np.asarray(image.convert("RGB"), np.float32)
    b = np.asarray(reference.convert("RGB"), np.float32)
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).mean())


def emphasised(text: str, colours: Iterable[str], weight: float) -> str:
    """``text`` with the first free-standing occurrence of each colour word written ``(colour:weight)``."""
    for c in colours:
        text = text.replace(f" {c} ", f" ({c}:{weight:g}) ", 1)
    return text


def and_prompt(scene) -> str:
    """A two-object scene's canonical caption with its two object phrases joined by ``AND``."""
    if len(scene.objects) != 2:
        raise ValueError("an AND prompt needs a two-object scene")
    return scene.caption.replace(" and ", " AND ", 1)


def _frac(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _row(scores) -> dict:
    from aipaint_plugins.shapes_world.evaluate import summarize

    r = summarize(scores)
    r["colour_and_background"] = float(np.mean([colour_and_background(s) for s in scores]))
    r["colours_right"] = float(np.mean([colours_right(s) for s in scores]))
    one = [s for s in scores if len(s.details["objects"]) == 1]
    r["one_object"] = {"n": len(one),
                       "colour_and_background": float(np.mean([colour_and_background(s) for s in one])) if one else None,
                       "all_correct": float(np.mean([s.all_correct for s in one])) if one else None}
    return r


# --------------------------------------------------------------------------- feature rows
def recoloured_scenes(base: list, seed: int = 3003) -> list:
    """Each scene with its first object in another training colour (the scene stays a training one)."""
    from aipaint_plugins.shapes_world.scene import HELDOUT_COMBOS, TRAIN_COLOURS, Scene

    rng = np.random.default_rng(seed)
    out = []
    for s in base:
        o = s.objects[0]
        options = [c for c in TRAIN_COLOURS if c != o.colour and (c, o.shape) not in HELDOUT_COMBOS
                   and all(c != other.colour for other in s.objects[1:])]
        b = options[int(rng.integers(len(options)))]
        out.append(Scene(s.background, (dataclasses.replace(o, colour=b), *s.objects[1:])))
    return out


def feature_rows(pipe, n: int, sampler_n: int | None = None, table_only: bool = False) -> dict:
    """The rows a user's first tries meet (see the module docstring); every prompt is scored
    on the attributes it asks for. ``sampler_n`` pairs per sampler x schedule (default ``n``)."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import free_caption

    sampler_n = n if sampler_n is None else sampler_n
    rows: dict = {}
    base = scenes(n, seed=3000)
    started = time.perf_counter()
    for mode in (("heldout",) if table_only else ("train", "heldout")):
        if not n:
            break
        rng = np.random.default_rng(3001)
        caps = [free_caption(s, rng, mode) for s in base]
        rows[f"phrasings_{mode}"] = _row([adherence(pipe.txt2img(c, seed=3000 + i).image, c)
                                          for i, c in enumerate(caps)])
    seconds: dict[str, float] = {"phrasings": time.perf_counter() - started}

    def timed(name: str, fn, *args):
        started = time.perf_counter()
        result = fn(*args)
        seconds[name] = time.perf_counter() - started
        return result

    if n:
        rows.update(timed("emphasis", emphasis_rows, pipe, base))
        rows.update(timed("prompt_edit", prompt_edit_rows, pipe, base))
        rows.update(timed("img2img", img2img_rows, pipe, base))
        rows["hires_x2_0.5"] = timed("hires", hires_row, pipe, base)
        rows["and_two_objects"] = timed("and", and_row, pipe, scenes(n, seed=3004, n_objects=2))
    if sampler_n:
        rows["samplers_x_schedules"] = timed("samplers", sampler_rows, pipe, scenes(sampler_n, seed=3000))
    rows["seconds"] = seconds
    print_features(rows)
    return rows


def emphasis_rows(pipe, base: list) -> dict:
    """``(colour:1.3)`` on held-out phrasings (colours kept), and the asked colours' pixel share with
    ``(colour:1.3)`` against ``(colour:0.8)`` on the same seed."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import free_caption

    rng = np.random.default_rng(3002)
    caps = [free_caption(s, rng, "heldout") for s in base]
    rows: dict = {}
    shares: dict[float, list[float]] = {}
    for weight in (1.3, 0.8):
        scores, shares[weight] = [], []
        for i, (c, s) in enumerate(zip(caps, base)):
            colours = [o.colour for o in s.objects]
            image = pipe.txt2img(emphasised(c, colours, weight), seed=3000 + i).image
            scores.append(adherence(image, c))
            shares[weight].append(colour_share(image, colours))
        rows[f"emphasis_{weight:g}_heldout_phrasings"] = _row(scores)
    higher = [hi > lo for hi, lo in zip(shares[1.3], shares[0.8])]
    rows["emphasis_share"] = {"n": len(higher), "share_1.3": _frac(shares[1.3]), "share_0.8": _frac(shares[0.8]),
                              "higher_with_1.3": _frac(higher)}
    return rows


def prompt_edit_rows(pipe, base: list) -> dict:
    """``[A:B:0.2]`` of the first object's colour draws B; ``[A:B:0.9]`` draws A."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    recoloured = recoloured_scenes(base)
    rows: dict = {}
    for when, expected, label in ((0.2, recoloured, "prompt_edit_0.2_to_B"), (0.9, base, "prompt_edit_0.9_to_A")):
        scores, edited = [], []
        for i, (s, t, e) in enumerate(zip(base, recoloured, expected)):
            a_col, b_col, shape = s.objects[0].colour, t.objects[0].colour, s.objects[0].shape
            prompt = s.caption.replace(f"{a_col} {shape}", f"[{a_col}:{b_col}:{when:g}] {shape}", 1)
            sc = adherence(pipe.txt2img(prompt, seed=3000 + i).image, e.caption)
            scores.append(sc)
            edited.append(object_colour_right(sc, e.objects[0]))
        rows[label] = _row(scores)
        rows[label]["edited_colour"] = _frac(edited)
    return rows


def img2img_rows(pipe, base: list) -> dict:
    """img2img of each scene's render towards the prompt of the scene with its first object recoloured,
    at the default CFG and strengths 0.1 .. 0.9."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.render import render

    recoloured = recoloured_scenes(base)
    inputs = [render(s) for s in base]
    change: dict[float, list[float]] = {}
    layout: dict[float, list[bool]] = {}
    new_colour: dict[float, list[bool]] = {}
    towards_b: dict[float, list] = {}
    for strength in IMG2IMG_STRENGTHS:
        change[strength], layout[strength], new_colour[strength], towards_b[strength] = [], [], [], []
        for i, (image, s, t) in enumerate(zip(inputs, base, recoloured)):
            outp = pipe.img2img(image, t.caption, denoising_strength=strength, seed=3000 + i).image
            change[strength].append(mean_abs_change(outp, image))
            layout[strength].append(layout_kept(adherence(outp, s.caption)))
            sc = adherence(outp, t.caption)
            towards_b[strength].append(sc)
            new_colour[strength].append(object_colour_right(sc, t.objects[0]))
    means = [float(np.mean(change[s])) for s in IMG2IMG_STRENGTHS]
    return {
        "img2img_to_B": {s: _row(towards_b[s]) for s in (0.3, 0.6, 0.9)},
        "img2img_sweep": {
            "n": len(inputs),
            "strengths": list(IMG2IMG_STRENGTHS),
            "mean_abs_change": means,
            "monotone": bool(all(b > a for a, b in zip(means, means[1:]))),
            "layout_kept": [_frac(layout[s]) for s in IMG2IMG_STRENGTHS],
            "new_colour": [_frac(new_colour[s]) for s in IMG2IMG_STRENGTHS],
            "layout_kept_0.3": _frac(layout[0.3]),
            "new_colour_0.8": _frac(new_colour[0.8]),
        },
    }


def hires_row(pipe, base: list) -> dict:
    """Hires fix x2 (A1111's default latent upscaler) at denoising 0.5 from the request; the 64 px picture is
    read by the evaluator (box-filtered to 32 px) and compared with the first pass drawn alone."""
    from aipaint_plugins.shapes_world.evaluate import adherence, read_scene, summarize
    from aipaint_plugins.upscale.hires import hires_fix

    from aipaint.api.request import GenerationRequest

    kept, scores, sizes = [], [], set()
    for i, s in enumerate(base):
        first = pipe.txt2img(s.caption, seed=3000 + i).image
        big = hires_fix(pipe, GenerationRequest(s.caption, seed=3000 + i), scale=2.0, denoising_strength=0.5).image
        sizes.add(big.size)
        kept.append(same_objects(read_scene(first), read_scene(big)))
        scores.append(adherence(big, s.caption))
    return {"n": len(kept), "kept": _frac(kept), "sizes": sorted(sizes), "adherence": summarize(scores)}


def and_row(pipe, two: list) -> dict:
    """``a … on the left AND a … on the right, on a … background`` for two-object scenes."""
    from aipaint_plugins.shapes_world.evaluate import adherence

    scores = [adherence(pipe.txt2img(and_prompt(s), seed=3000 + i).image, s.caption) for i, s in enumerate(two)]
    r = _row(scores)
    r["both_present"] = _frac(both_present(s) for s in scores)
    return r


def sampler_combinations(pipe) -> list[tuple[str, str]]:
    """Every registered sampler with each schedule type it supports (A1111's names)."""
    return [(spec.name, schedule) for spec in pipe.host.registry.samplers for schedule in spec.schedules]


def sampler_rows(pipe, base: list) -> dict:
    from aipaint_plugins.shapes_world.evaluate import adherence

    rows = {}
    for sampler, schedule in sampler_combinations(pipe):
        sc = [adherence(pipe.txt2img(s.caption, seed=3000 + i, sampler=sampler, schedule=schedule).image, s.caption)
              for i, s in enumerate(base)]
        rows[f"{sampler} / {schedule}"] = _row(sc)
    return rows


def print_features(rows: dict) -> None:
    def line(name: str, r: dict) -> None:
        one = r["one_object"]
        print(f"{name:>34}: n={r['n']} colour+background {r['colour_and_background']:.1%}, all asked right "
              f"{r['all_correct']:.1%}, attributes {r['score']:.1%} (colour {_pct(r['colour_acc'])}); one object "
              f"(n={one['n']}): colour+background {_pct(one['colour_and_background'])}, all asked right "
              f"{_pct(one['all_correct'])}")

    for key in ("phrasings_train", "phrasings_heldout", "emphasis_1.3_heldout_phrasings",
                "emphasis_0.8_heldout_phrasings", "prompt_edit_0.2_to_B", "prompt_edit_0.9_to_A", "and_two_objects"):
        if key in rows:
            line(key, rows[key])
    if "emphasis_share" in rows:
        e = rows["emphasis_share"]
        print(f"{'asked colours pixel share':>34}: n={e['n']} (colour:1.3) {e['share_1.3']:.1%}, (colour:0.8) "
              f"{e['share_0.8']:.1%}; 1.3 higher in {e['higher_with_1.3']:.1%} of pairs")
    for strength, r in rows.get("img2img_to_B", {}).items():
        line(f"img2img to B, strength {strength}", r)
    if "img2img_sweep" in rows:
        w = rows["img2img_sweep"]
        for s, c, lk, nc in zip(w["strengths"], w["mean_abs_change"], w["layout_kept"], w["new_colour"]):
            print(f"{'img2img strength ' + format(s, 'g'):>34}: n={w['n']} mean |change| {c:5.1f}, layout kept "
                  f"{lk:.1%}, new colour {nc:.1%}")
    if "hires_x2_0.5" in rows:
        h = rows["hires_x2_0.5"]
        print(f"{'hires fix x2, denoising 0.5':>34}: n={h['n']} objects kept {h['kept']:.1%}; adherence "
              f"{h['adherence']['score']:.1%}, all correct {h['adherence']['all_correct']:.1%} (sizes {h['sizes']})")
    for key, r in rows.get("samplers_x_schedules", {}).items():
        line(key, r)
    if rows.get("seconds"):
        print("feature rows took " + ", ".join(f"{k} {v:.0f} s" for k, v in rows["seconds"].items()))


# --------------------------------------------------------------------------- timings and LoRA
def timings(pipe, train_caps: list[str], threads: int, out: dict, *, time_threads: int | None = None,
            images: int = 10, cold: bool = True) -> None:
    """Warm 20-step images with ``time_threads`` torch threads available: as the runtime runs them by
    default (its ``threads=auto`` may use fewer), then with the job forced onto all of them."""
    d = pipe.model.defaults
    time_threads = time_threads or threads
    chosen = getattr(pipe.model, "intra_op_threads", None)

    def median_time() -> tuple[float, float]:
        pipe.txt2img(train_caps[0], seed=0)  # warm-up
        times = []
        for i in range(images):
            started = time.perf_counter()
            pipe.txt2img(train_caps[i % len(train_caps)], seed=i)
            times.append(time.perf_counter() - started)
        return float(np.median(times)), float(min(times))

    torch.set_num_threads(time_threads)
    try:
        median, fastest = median_time()
        forced = None
        if chosen is not None and chosen != time_threads:
            pipe.model.intra_op_threads = time_threads
            try:
                forced = median_time()
            finally:
                pipe.model.intra_op_threads = chosen
    finally:
        torch.set_num_threads(threads)
    job_threads = chosen or time_threads
    out["warm_seconds_per_image"] = median
    out["warm_timing"] = {"threads": time_threads, "job_threads": job_threads, "images": images, "median": median,
                          "min": fastest, "reason": getattr(pipe.model, "threads_reason", None),
                          "forced_all_threads": forced[0] if forced else None}
    print(f"one {d.steps}-step image, warm process: median {median:.3f} s (min {fastest:.3f} s) "
          f"with {time_threads} threads available, the job on {job_threads}"
          + (f"; forced onto {time_threads}: median {forced[0]:.3f} s (min {forced[1]:.3f} s)" if forced else ""))
    if not cold:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "aipaint", "generate", train_caps[0], "--seed", "1", "--no-progress", "-o", str(Path(tmp) / "x.png")]
        started = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        out["cold_cli_seconds"] = time.perf_counter() - started
    print(f"`aipaint generate` from a cold start: {out['cold_cli_seconds']:.2f} s")


_LORA_ROW = re.compile(r"^orange adherence, w=(?P<w>[0-9.]+)\s+(?P<all>\d+)%", re.M)


def lora_from_results(path: Path) -> dict:
    """The LoRA numbers (weight 1, weight 0) of the first table in benchmarks/results/lora_concept.txt."""
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        return {"found": False, "note": f"{rel} not found (run benchmarks/lora_concept.py --save, or --lora)"}
    text = path.read_text(encoding="utf-8", errors="replace")
    weights: dict[str, float] = {}
    for m in _LORA_ROW.finditer(text):
        w = format(float(m.group("w")), "g")
        if w in weights:  # the second table begins
            break
        weights[w] = int(m.group("all")) / 100
    if "1" not in weights or "0" not in weights:
        return {"found": False, "note": f"{rel}: no 'orange adherence, w=0 / w=1' rows"}
    head = text[: text.find("orange adherence")]
    command = next((ln.lstrip("#").strip() for ln in head.splitlines() if ln.startswith("## ")), "")
    when = re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", head)
    per_weight = re.search(r"evaluation: (\d+) images per weight", head)
    note = f"{rel}, first table" + (f" ({when.group(0)})" if when else "")
    return {"found": True, "w1": weights["1"], "w0": weights["0"], "source": str(rel), "command": command,
            "n": int(per_weight.group(1)) if per_weight else None, "note": note}


def lora_row(pipe, model: str | None, eval_images: int = 4) -> dict:
    """benchmarks/lora_concept.py's recipe on this pipeline: 96 orange renders, `aipaint train lora`'s
    settings (its defaults, the model card's recipe), weights 0 and 1 on its 12 prompts x ``eval_images``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lora_concept
    from aipaint_plugins.lora.commands import training_settings
    from aipaint_plugins.lora.train import train_lora

    work = Path(tempfile.mkdtemp(prefix="embedded-lora-"))
    try:
        lora_concept.render_dataset(work / "data", 96, seed=1)
        given = argparse.Namespace(steps=None, learning_rate=None, batch_size=None, train_text_encoder=None)
        settings, _ = training_settings(given, getattr(pipe.model, "card", None))
        started = time.perf_counter()
        train_lora(pipe, work / "data", work / "loras" / "orange.safetensors", rank=4, seed=0, show_progress=False,
                   **settings)
        seconds = time.perf_counter() - started
        rows = {w: lora_concept.adherence_at(pipe, w, work / "loras", eval_images, None) for w in (0.0, 1.0)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"LoRA (orange): trained {seconds:.0f} s with {settings}; weight 1 {rows[1.0]['all']:.0%}, "
          f"weight 0 {rows[0.0]['all']:.0%}")
    return {"found": True, "w1": rows[1.0]["all"], "w0": rows[0.0]["all"], "train_seconds": seconds,
            "settings": settings, "source": "--lora", "n": 12 * eval_images,
            "note": f"trained here (--lora) on {model or 'the embedded model'}, {12 * eval_images} images per weight"}


# --------------------------------------------------------------------------- the table
def _judge(value, op: str, threshold: float) -> bool | None:
    if value is None:
        return None
    return bool(value >= threshold if op == ">=" else value <= threshold if op == "<=" else value < threshold)


def build_table(out: dict) -> list[dict]:
    """The issue's target table from the measured numbers in ``out``; a row whose numbers are missing is
    ``not run``."""
    f = out.get("features", {})
    rows: list[dict] = []

    def add(behaviour: str, value, op: str, threshold: float, n=None, note: str = "", unit: str = "%",
            passed: bool | None = None, measured: str | None = None) -> None:
        if measured is None:
            measured = ("-" if value is None else f"{value:.1%}" if unit == "%" else f"{value:.3f} s")
        if n is not None and value is not None:
            measured += f" [{n}]"
        target = f"{op.replace('>=', '≥ ').replace('<=', '≤ ').replace('<', '< ')}" + (
            f"{threshold:.0%}" if unit == "%" else f"{threshold:g} s")
        rows.append({"behaviour": behaviour, "measured": measured, "value": value, "target": target,
                     "pass": _judge(value, op, threshold) if passed is None else passed, "n": n, "note": note})

    def get(key, field):
        r = out.get(key) if not isinstance(key, tuple) else f.get(key[1])
        if not r or not r.get("n"):
            return None, None
        return r.get(field), r["n"]

    one, n1 = get("train_one_object", "all_correct")
    add("canonical captions, one object: all attributes right", one, ">=", 0.97, n1)
    v, n = get("train_two_objects", "all_correct")
    add("canonical captions, two objects: all attributes right", v, ">=", 0.90, n)
    v, n = get("heldout_combo", "all_correct")
    add("canonical, held-out colour x shape combos: all right", v, ">=", 0.85, n, "one and two objects")
    v, n = get(("f", "phrasings_heldout"), "colour_and_background")
    add("unseen phrasings: colour and background right", v, ">=", 0.95, n, "one and two objects")
    v, n = get(("f", "phrasings_heldout"), "all_correct")
    add("unseen phrasings: all asked attributes right", v, ">=", 0.90, n, "one and two objects")

    w = f.get("img2img_sweep")
    if w and w["n"]:
        changes = " ".join(f"{c:.0f}" for c in w["mean_abs_change"])
        rows.append({"behaviour": "img2img, default CFG: change grows with strength 0.1..0.9",
                     "measured": f"{'yes' if w['monotone'] else 'no'} [{w['n']}]", "value": float(w["monotone"]),
                     "target": "monotone", "pass": w["monotone"], "n": w["n"],
                     "note": f"mean |pixel change| {changes}"})
    else:
        add("img2img, default CFG: change grows with strength 0.1..0.9", None, ">=", 1.0, measured="-")
        rows[-1]["target"] = "monotone"
    add("img2img at strength 0.3: layout kept", w["layout_kept_0.3"] if w else None, ">=", 0.90,
        w["n"] if w else None, "input's objects at their positions, shapes; nothing extra")
    add("img2img at strength 0.8: the prompt's new colour", w["new_colour_0.8"] if w else None, ">=", 0.90,
        w["n"] if w else None, "the recoloured object")
    v, n = get(("f", "prompt_edit_0.2_to_B"), "edited_colour")
    add("prompt editing [A:B:0.2]: B's colour", v, ">=", 0.90, n)
    v, n = get(("f", "prompt_edit_0.9_to_A"), "edited_colour")
    add("prompt editing [A:B:0.9]: A's colour", v, ">=", 0.90, n)
    v, n = get(("f", "emphasis_1.3_heldout_phrasings"), "colours_right")
    add("emphasis (colour:1.3) keeps the asked colour", v, ">=", 0.95, n, "held-out phrasings")
    v, n = get(("f", "emphasis_share"), "higher_with_1.3")
    e = f.get("emphasis_share") or {}
    add("emphasis: colour's pixel share, 1.3 > 0.8 (pairs)", v, ">=", 0.90, n,
        f"mean share {e['share_1.3']:.1%} vs {e['share_0.8']:.1%}" if v is not None else "")
    v, n = get(("f", "hires_x2_0.5"), "kept")
    add("hires fix x2, strength 0.5: objects/colours/positions kept", v, ">=", 0.90, n, "vs the first pass")

    combos = f.get("samplers_x_schedules") or {}
    if combos:
        worst = min(combos, key=lambda k: combos[k]["score"])
        mean = float(np.mean([r["score"] for r in combos.values()]))
        below = sum(r["score"] < 0.90 for r in combos.values())
        add(f"every sampler x schedule ({len(combos)}): attributes present", combos[worst]["score"], ">=", 0.90,
            combos[worst]["n"], f"worst {worst}; mean {mean:.1%}; {below} below 90%")
        rows[-1]["measured"] = "worst " + rows[-1]["measured"]
    else:
        add("every sampler x schedule: attributes present", None, ">=", 0.90)
    v, n = get(("f", "and_two_objects"), "both_present")
    add("AND of two object phrases: both objects present", v, ">=", 0.80, n, "shape and colour of each")
    add("default settings: all attributes right", one, ">=", 0.97, n1, "= row 1 (one-object canonical, card defaults)")

    lora = out.get("lora") or {}
    found = lora.get("found")
    add("aipaint train lora (CLI defaults), weight 1: held-out colour", lora.get("w1") if found else None, ">=", 0.85,
        lora.get("n"), lora.get("note", ""))
    add("base model without the LoRA: held-out colour", lora.get("w0") if found else None, "<", 0.20, lora.get("n"),
        lora.get("note", "") if found else "")
    t = out.get("warm_timing")
    add("warm 20-step image, 2 threads", t["median"] if t else None, "<=", 0.4, None,
        (f"median of {t['images']}, {t['threads']} threads available, the job ran on {t.get('job_threads', t['threads'])}"
         + (f" (runtime threads=auto; forced onto {t['threads']}: {t['forced_all_threads']:.3f} s)"
            if t.get("forced_all_threads") is not None else "")) if t else "", unit="s")
    if t and t["threads"] != 2:
        rows[-1]["pass"] = None
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    widths = (62, 20, 9, 7)
    head = ("behaviour", "measured", "target", "result")
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  note")
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    for r in rows:
        result = "not run" if r["value"] is None else "pass" if r["pass"] else "FAIL" if r["pass"] is False else "n/a"
        cells = (r["behaviour"], r["measured"], r["target"], result)
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + ("  " + r["note"] if r["note"] else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
