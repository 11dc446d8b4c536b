"""The shapes world: scene description, canonical captions and their parser.

A *scene* is a background colour plus one or two coloured shapes. Every scene has
exactly one canonical English caption (``caption(scene)``) and ``parse_caption``
turns such a caption back into the attributes it asks for. Everything random is
driven by an explicit ``numpy.random.Generator`` so datasets are reproducible.

Splits
------
``train``           colours from ``TRAIN_COLOURS`` and no held-out colour×shape combo.
``heldout_combo``   like train, but at least one object is a ``HELDOUT_COMBOS`` pair.
``heldout_colour``  at least one object is ``HELDOUT_COLOUR`` (orange), which never
                    appears in a training caption (a LoRA teaches it later).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

#: Object colours (saturated, mutually distinct). ``orange`` is held out of training.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "yellow": (240, 220, 0),
    "green": (0, 170, 0),
    "cyan": (0, 200, 220),
    "blue": (20, 40, 230),
    "magenta": (220, 0, 220),
    "orange": (255, 140, 0),
}
HELDOUT_COLOUR = "orange"
TRAIN_COLOURS: tuple[str, ...] = tuple(c for c in COLOURS if c != HELDOUT_COLOUR)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

#: colour×shape pairs never shown in training captions (generalisation probes).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")}
)

#: object size names and the pixel extents (at 32×32) they are drawn with.
SIZES: dict[str, tuple[int, ...]] = {"small": (8, 9), "big": (13, 14)}
SIZE_THRESHOLD = 11.0  # extent (px) separating small from big when reading images

#: anchor centre (x, y) of each position at 32×32.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
    "center": (16.0, 16.0),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
SPLITS = ("train", "heldout_combo", "heldout_colour")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    # pixel geometry (32×32 coordinates); only used for rendering
    cx: float = 0.0
    cy: float = 0.0
    extent: float = 0.0

    def attrs(self) -> tuple[str, str, str, str]:
        return (self.shape, self.colour, self.size, self.position)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        return caption(self)


# --------------------------------------------------------------------------- captions
def _object_phrase(o: SceneObject) -> str:
    return f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}"


_ORDER = {"left": 0, "top": 0, "center": 0, "right": 1, "bottom": 1}


def caption(scene: Scene) -> str:
    """The canonical caption, e.g. ``"a big red circle on the left, on a white background"``."""
    objs = sorted(scene.objects, key=lambda o: _ORDER[o.position])
    body = " and ".join(_object_phrase(o) for o in objs)
    return f"{body}, on a {scene.background} background"


@dataclass(frozen=True)
class ParsedCaption:
    background: str | None
    objects: tuple[tuple[str, str, str, str], ...]  # (shape, colour, size, position)


_POS_RE = "|".join(re.escape(p) for p in POSITION_PHRASES.values())
_OBJ_RE = re.compile(
    rf"\ban?\s+(?P<size>[a-z]+)\s+(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)\s+(?P<pos>{_POS_RE})"
)
_BG_RE = re.compile(r"on an?\s+(?P<bg>[a-z]+)\s+background")
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text: str) -> ParsedCaption:
    """Attributes a caption asks for. Unknown words (e.g. a colour the world has never
    seen) are kept verbatim so the held-out colour parses like any other."""
    t = " ".join(text.lower().replace("centre", "center").replace("grey", "gray").split())
    bg_m = _BG_RE.search(t)
    background = bg_m.group("bg") if bg_m else None
    body = t[: bg_m.start()] if bg_m else t
    objects = []
    for m in _OBJ_RE.finditer(body):
        objects.append((m.group("shape"), m.group("colour"), m.group("size"), _PHRASE_TO_POS[m.group("pos")]))
    return ParsedCaption(background=background, objects=tuple(objects))


# --------------------------------------------------------------------------- sampling
def _is_train_obj(colour: str, shape: str) -> bool:
    return colour != HELDOUT_COLOUR and (colour, shape) not in HELDOUT_COMBOS


def _place(rng: np.random.Generator, position: str, extent: float, paired: bool) -> tuple[float, float]:
    ax, ay = POSITIONS[position]
    jx, jy = (int(v) for v in rng.integers(-1, 2, size=2))
    if paired:
        # keep pairs apart: only jitter outwards along the pair axis
        if position in ("left", "right"):
            jx = -abs(jx) if position == "left" else abs(jx)
        else:
            jy = -abs(jy) if position == "top" else abs(jy)
    cx, cy = ax + jx, ay + jy
    half = extent / 2.0
    cx = float(np.clip(cx, half, IMAGE_SIZE - half))
    cy = float(np.clip(cy, half, IMAGE_SIZE - half))
    return cx, cy


def _sample_attrs(rng: np.random.Generator, split: str, n: int) -> list[tuple[str, str]]:
    """(colour, shape) per object satisfying the split's constraint."""
    while True:
        if split == "heldout_colour":
            cols = list(rng.choice(list(TRAIN_COLOURS) + [HELDOUT_COLOUR], size=n))
            if HELDOUT_COLOUR not in cols:
                cols[int(rng.integers(n))] = HELDOUT_COLOUR
            shapes = list(rng.choice(SHAPES, size=n))
            return [(str(c), str(s)) for c, s in zip(cols, shapes)]
        cols = [str(c) for c in rng.choice(TRAIN_COLOURS, size=n)]
        shapes = [str(s) for s in rng.choice(SHAPES, size=n)]
        train_ok = [_is_train_obj(c, s) for c, s in zip(cols, shapes)]
        if split == "train" and all(train_ok):
            return list(zip(cols, shapes))
        if split == "heldout_combo" and not all(train_ok):
            return list(zip(cols, shapes))


def random_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene of the given split (deterministic for a seeded ``rng``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, 3))
    background = str(rng.choice(list(BACKGROUNDS)))
    attrs = _sample_attrs(rng, split, n)
    if n == 1:
        positions = [str(rng.choice(list(POSITIONS)))]
    else:
        positions = list(PAIRS[int(rng.integers(len(PAIRS)))])
    objs = []
    for (colour, shape), pos in zip(attrs, positions):
        size = str(rng.choice(list(SIZES)))
        extent = float(rng.choice(SIZES[size]))
        cx, cy = _place(rng, pos, extent, paired=n > 1)
        objs.append(SceneObject(shape, colour, size, pos, cx, cy, extent))
    return Scene(background, tuple(objs))


def scene_split(scene: Scene) -> str:
    """Which split a scene belongs to (by its objects)."""
    if any(o.colour == HELDOUT_COLOUR for o in scene.objects):
        return "heldout_colour"
    if any((o.colour, o.shape) in HELDOUT_COMBOS for o in scene.objects):
        return "heldout_combo"
    return "train"


# --------------------------------------------------------------------------- caption noise
NOISY_ATTRIBUTES = ("shape", "colour", "size")


def noisy_caption(text: str, rng: np.random.Generator, p: float, attributes=NOISY_ATTRIBUTES) -> str:
    """``text`` with each object's shape, colour and size (those of them in ``attributes``)
    swapped, each with probability ``p``, for a random other value: captions that are
    sometimes wrong, as web alt text is.

    A model trained on them is less sure of a caption than the caption deserves, so
    classifier-free guidance is what makes it adhere, as it is for Stable Diffusion
    (``python -m aipaint.world.train --caption-noise``). The noise never writes the held-out
    colour or a held-out colour×shape pair, so the splits stay held out of every caption.
    Captions that do not parse are returned unchanged.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption noise must be in [0, 1], got {p}")
    unknown = set(attributes) - set(NOISY_ATTRIBUTES)
    if unknown:
        raise ValueError(f"caption noise attributes must be among {NOISY_ATTRIBUTES}, got {sorted(unknown)}")
    ps = {a: (p if a in attributes else 0.0) for a in NOISY_ATTRIBUTES}
    parsed = parse_caption(text)
    if p == 0.0 or not parsed.objects or parsed.background is None:
        return text
    objs = []
    for shape, colour, size, position in parsed.objects:
        for _ in range(100):  # redraw until the noisy object is a training combination
            s = _swap(rng, ps["shape"], shape, SHAPES)
            c = _swap(rng, ps["colour"], colour, TRAIN_COLOURS)
            if _is_train_obj(c, s) or (s, c) == (shape, colour):
                break
        else:
            s, c = shape, colour
        z = _swap(rng, ps["size"], size, tuple(SIZES))
        objs.append(SceneObject(s, c, z, position))
    return caption(Scene(parsed.background, tuple(objs)))


def _swap(rng: np.random.Generator, p: float, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices or rng.random() >= p:
        return value
    others = [v for v in choices if v != value]
    return str(others[int(rng.integers(len(others)))])
