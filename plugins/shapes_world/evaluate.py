"""Read a shapes-world image back into attributes and score prompt adherence.

Works on any image size (it is resized to 32×32 first) and is meant to be robust
to the blur and colour drift of a small generative model:

* background = median of the border pixels, named by the nearest background colour;
* foreground = pixels far from the background, split into connected components;
* colour = nearest palette colour (held-out ``orange`` included) to the median of
  each component's strongest pixels;
* shape, size and centre = the best soft-IoU fit of each shape template (rendered
  analytically with 4× supersampling) over a small grid of centres and sizes;
* position = the nearest anchor (left/right/top/bottom/center) to that centre.

``adherence(image, caption)`` matches detected objects to the objects the caption
asks for by the best assignment and reports the fraction of requested attributes
(per object: shape, colour, size, position; plus the background) that are present.
A free phrasing (:func:`aipaint_plugins.shapes_world.scene.free_caption`) is scored only on the
attributes it asks for.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np
from aipaint_plugins.shapes_world.render import CROSS_THICKNESS
from aipaint_plugins.shapes_world.scene import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZE_THRESHOLD,
    parse_caption,
)
from PIL import Image

FG_THRESHOLD = 60.0  # RGB distance (0..255 scale) from the background
MIN_AREA = 6  # px at 32×32; smaller components are noise
MAX_OBJECTS = 6
_SS = 4  # supersampling for templates
_ORDER = {"left": 0, "top": 0, "center": 0, "right": 1, "bottom": 1}


@dataclass(frozen=True)
class ObjectReading:
    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    extent: float
    rgb: tuple[int, int, int]
    area: int
    shape_iou: float

    def attrs(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.position)


@dataclass(frozen=True)
class Reading:
    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[ObjectReading, ...]


@dataclass(frozen=True)
class AdherenceScore:
    score: float  # matched / total
    matched: int
    total: int
    all_correct: bool  # every requested attribute present and no extra objects
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers
def _to_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = image.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        up = img.size[0] < IMAGE_SIZE or img.size[1] < IMAGE_SIZE
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC if up else Image.BOX)
    return np.asarray(img, dtype=np.float32)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = [float(np.sum((rgb - np.asarray(table[n], np.float32)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx, cy, s) -> np.ndarray:
    """Membership of points (x, y) in shape(s); cx, cy, s broadcast over a leading axis."""
    h = s / 2.0
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2.0)
    if shape == "cross":
        t = s * CROSS_THICKNESS / 2.0
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= h) & (ay <= t)) | ((ax <= t) & (ay <= h))
    raise ValueError(shape)


def _fit_shape(alpha: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best (shape, cx, cy, size, iou) for a coverage crop whose top-left is (x0, y0)."""
    hgt, wid = alpha.shape
    cols = np.where(alpha.max(0) > 0.5)[0]
    rows = np.where(alpha.max(1) > 0.5)[0]
    if len(cols) == 0 or len(rows) == 0:
        cols = rows = np.array([0])
    bx0, bx1, by0, by1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    c0x, c0y = x0 + (bx0 + bx1) / 2.0, y0 + (by0 + by1) / 2.0
    s0 = float(max(bx1 - bx0, by1 - by0))
    offs = np.array([-0.5, 0.0, 0.5])
    sizes = s0 + np.arange(-1.5, 1.51, 0.5)
    cx, cy, ss = np.meshgrid(c0x + offs, c0y + offs, sizes, indexing="ij")
    cx, cy, ss = (v.reshape(-1, 1, 1) for v in (cx, cy, ss))
    sub = (np.arange(_SS) + 0.5) / _SS
    px = (x0 + np.arange(wid)[:, None] + sub[None, :]).reshape(-1)
    py = (y0 + np.arange(hgt)[:, None] + sub[None, :]).reshape(-1)
    X, Y = px[None, None, :], py[None, :, None]
    ay = np.kron(np.eye(hgt, dtype=np.float32), np.full((1, _SS), 1.0 / _SS, np.float32))
    ax = np.kron(np.eye(wid, dtype=np.float32), np.full((_SS, 1), 1.0 / _SS, np.float32))
    best = ("circle", c0x, c0y, s0, -1.0)
    for shape in SHAPES:
        m = _inside(shape, X, Y, cx, cy, ss).astype(np.float32)  # (n, H*ss, W*ss)
        cov = ay @ m @ ax  # box-average the supersamples: (n, H, W)
        inter = np.minimum(cov, alpha[None]).sum((1, 2))
        union = np.maximum(cov, alpha[None]).sum((1, 2))
        iou = inter / np.maximum(union, 1e-6)
        i = int(np.argmax(iou))
        if iou[i] > best[4]:
            best = (shape, float(cx[i, 0, 0]), float(cy[i, 0, 0]), float(ss[i, 0, 0]), float(iou[i]))
    return best


def _nearest_position(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


# --------------------------------------------------------------------------- reading
def read_scene(image) -> Reading:
    """Read background and objects from an image (PIL image or HWC uint8 array)."""
    a = _to_array(image)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    bg = np.median(border, axis=0)
    # refine: median of the border pixels close to the first estimate
    close = border[np.linalg.norm(border - bg, axis=1) < 40]
    if len(close) >= 8:
        bg = np.median(close, axis=0)
    dist = np.linalg.norm(a - bg, axis=2)
    mask = (dist > FG_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    comps = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= MIN_AREA]
    comps = sorted(comps, key=lambda i: -stats[i, cv2.CC_STAT_AREA])[:MAX_OBJECTS]
    objs = []
    for i in comps:
        comp = labels == i
        d = dist[comp]
        core = a[comp][d >= 0.6 * d.max()]
        rgb = np.median(core, axis=0)
        colour = _nearest(rgb, COLOURS)
        # coverage of this object: projection onto the background→colour line, in a
        # 1-px dilated region of the component (antialiased edges), other objects removed
        region = cv2.dilate(comp.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        region &= (labels == 0) | comp
        v = rgb - bg
        alpha = np.clip(((a - bg) @ v) / max(float(v @ v), 1e-6), 0.0, 1.0) * region
        ys, xs = np.where(region)
        y0, y1 = max(0, ys.min() - 1), min(IMAGE_SIZE, ys.max() + 2)
        x0, x1 = max(0, xs.min() - 1), min(IMAGE_SIZE, xs.max() + 2)
        shape, cx, cy, s, iou = _fit_shape(alpha[y0:y1, x0:x1], x0, y0)
        objs.append(
            ObjectReading(
                shape=shape,
                colour=colour,
                size="big" if s >= SIZE_THRESHOLD else "small",
                position=_nearest_position(cx, cy),
                cx=cx,
                cy=cy,
                extent=s,
                rgb=tuple(int(round(float(c))) for c in rgb),
                area=int(stats[i, cv2.CC_STAT_AREA]),
                shape_iou=iou,
            )
        )
    objs.sort(key=lambda o: (_ORDER[o.position], o.cy, o.cx))
    return Reading(
        background=_nearest(bg, BACKGROUNDS),
        background_rgb=tuple(int(round(float(c))) for c in bg),
        objects=tuple(objs),
    )


# --------------------------------------------------------------------------- adherence
_ATTRS = ("shape", "colour", "size", "position")


def adherence(image, caption: str, reading: Reading | None = None) -> AdherenceScore:
    """Fraction of the attributes ``caption`` asks for that ``image`` shows.

    Detected objects are assigned to requested objects (one-to-one) so as to
    maximise the number of matching attributes; an unmatched requested object
    scores 0 for all its attributes. Extra detected objects do not lower ``score``
    but make ``all_correct`` false and are counted in ``details``.
    """
    want = parse_caption(caption)
    r = reading if reading is not None else read_scene(image)
    found = list(r.objects)
    k = len(want.objects)
    total = sum(v is not None for w in want.objects for v in w) + (1 if want.background is not None else 0)
    bg_ok = want.background is not None and r.background == want.background

    def hits(w, o) -> list[bool]:
        # an attribute the caption does not ask for is never a hit and never counted
        return [a is not None and o is not None and a == b for a, b in zip(w, o.attrs() if o else w)]

    slots = found + [None] * k
    best_sum, best_assign = -1, None
    for perm in itertools.permutations(range(len(slots)), k):
        s = sum(sum(hits(w, slots[j])) for w, j in zip(want.objects, perm))
        if s > best_sum:
            best_sum, best_assign = s, perm
    best_sum = max(best_sum, 0)
    per_obj = []
    used = set()
    for w, j in zip(want.objects, best_assign or ()):
        o = slots[j]
        if o is not None:
            used.add(j)
        h = hits(w, o)
        per_obj.append(
            {
                "asked": dict(zip(_ATTRS, w)),
                "found": dict(zip(_ATTRS, o.attrs())) if o is not None else None,
                **{a: ok for a, ok, asked in zip(_ATTRS, h, w) if asked is not None},
            }
        )
    matched = best_sum + int(bg_ok)
    extra = len(found) - len(used)
    return AdherenceScore(
        score=matched / total if total else 0.0,
        matched=matched,
        total=total,
        all_correct=(matched == total and extra == 0 and total > 0),
        details={
            "background": {"asked": want.background, "found": r.background,
                           "ok": bg_ok if want.background is not None else None},
            "objects": per_obj,
            "extra_objects": extra,
            "missing_objects": sum(1 for p in per_obj if p["found"] is None),
            "n_found": len(found),
        },
    )


def summarize(scores: list[AdherenceScore]) -> dict:
    """Mean score, fraction all-correct and per-attribute accuracy over many scores."""
    per = {a: [] for a in _ATTRS + ("background",)}
    for s in scores:
        if s.details["background"]["ok"] is not None:
            per["background"].append(s.details["background"]["ok"])
        for o in s.details["objects"]:
            for a in _ATTRS:
                if a in o:
                    per[a].append(o[a])
    return {
        "n": len(scores),
        "score": float(np.mean([s.score for s in scores])) if scores else 0.0,
        "all_correct": float(np.mean([s.all_correct for s in scores])) if scores else 0.0,
        **{f"{a}_acc": float(np.mean(v)) if v else None for a, v in per.items()},
    }


# --------------------------------------------------------------------------- models
def evaluate_pipeline(pipe, n: int = 40, split: str = "train", seed: int = 0, batch: int = 8, **call_kwargs) -> dict:
    """Generate ``n`` images for random ``split`` captions with a diffusers-style
    text-to-image pipeline (``pipe(prompt=[...], generator=[...], height, width,
    **call_kwargs).images``) and summarise their adherence. Image ``i`` uses
    ``torch.Generator().manual_seed(seed + i)``, so results are reproducible."""
    import torch
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    captions = [random_scene(rng, split).caption for _ in range(n)]
    scores = []
    for i in range(0, n, batch):
        caps = captions[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(caps))]
        kw = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, **call_kwargs}
        images = pipe(prompt=caps, generator=gens, **kw).images
        scores += [adherence(im, c) for im, c in zip(images, caps)]
    out = summarize(scores)
    out["split"] = split
    return out


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Score a shapes-world text-to-image model with the evaluator.")
    ap.add_argument("model", help="diffusers folder, e.g. zoo/models/shapes-tiny")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--rescale", type=float, default=0.0, help="guidance_rescale")
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        a.model, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    res = evaluate_pipeline(
        pipe, n=a.n, split=a.split, seed=a.seed,
        num_inference_steps=a.steps, guidance_scale=a.guidance, guidance_rescale=a.rescale,
    )
    res.update(steps=a.steps, guidance=a.guidance, guidance_rescale=a.rescale)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
