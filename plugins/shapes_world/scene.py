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
    # (shape, colour, size, position); None where a free phrasing does not ask for it
    objects: tuple[tuple[str | None, str | None, str | None, str | None], ...]


_POS_RE = "|".join(re.escape(p) for p in POSITION_PHRASES.values())
_OBJ_RE = re.compile(
    rf"\ban?\s+(?P<size>[a-z]+)\s+(?P<colour>[a-z]+)\s+(?P<shape>[a-z]+)\s+(?P<pos>{_POS_RE})"
)
_BG_RE = re.compile(r"on an?\s+(?P<bg>[a-z]+)\s+background")
_PHRASE_TO_POS = {v: k for k, v in POSITION_PHRASES.items()}


def parse_caption(text: str) -> ParsedCaption:
    """Attributes a caption asks for. A canonical caption's unknown words (e.g. a colour the
    world has never seen) are kept verbatim so the held-out colour parses like any other;
    any other phrasing (:func:`free_caption`) is read by its known words, with ``None`` for an
    attribute it leaves out."""
    t = " ".join(text.lower().replace("centre", "center").replace("grey", "gray").split())
    bg_m = _BG_RE.search(t)
    body = t[: bg_m.start()] if bg_m else t
    matches = list(_OBJ_RE.finditer(body))
    canonical = (
        bg_m is not None and bg_m.end() == len(t) and matches
        and body.rstrip(", ") == " and ".join(m.group(0) for m in matches)
        and all(m.group("size") in SIZES and m.group("shape") in SHAPES for m in matches)
    )
    if not canonical:
        return _parse_free(t)
    objects = tuple((m.group("shape"), m.group("colour"), m.group("size"), _PHRASE_TO_POS[m.group("pos")])
                    for m in matches)
    return ParsedCaption(background=bg_m.group("bg"), objects=objects)


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
    (``python -m aipaint_plugins.shapes_world.train --caption-noise``). The noise never writes the held-out
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


# --------------------------------------------------------------------------- free phrasings
#: How one object is named. ``{size}`` may be dropped; the article is added in front.
OBJECT_FORMS: dict[str, str] = {
    "adjectives": "{size} {colour} {shape}",
    "colour_first": "{colour} {size} {shape}",
    "in_colour": "{size} {shape} in {colour}",
    "coloured": "{size} {shape} coloured {colour}",
}
#: Paraphrases of each position; the first is the canonical caption's.
POSITION_WORDINGS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "to the left", "on the left side"),
    "right": ("on the right", "to the right", "on the right side"),
    "top": ("at the top", "near the top", "at the upper edge"),
    "bottom": ("at the bottom", "near the bottom", "at the lower edge"),
    "center": ("in the center", "in the middle", "in the centre"),
}
#: Where the position goes relative to its object.
POSITION_FORMS: dict[str, str] = {"after": "{obj} {pos}", "before": "{pos}, {obj}"}
#: How the background is said; ``{body}`` is the objects' phrase.
BACKGROUND_FORMS: dict[str, str] = {
    "comma_on": "{body}, on a {bg} background",
    "on": "{body} on a {bg} background",
    "against": "{body} against a {bg} background",
    "suffix": "{body}, {bg} background",
    "prefix": "{bg} background, {body}",
    "prefix_on": "on a {bg} background, {body}",
    "with": "{body} with a {bg} background",
}
#: (object form, background form) pairs never produced for training: every word in them is
#: trained, only the arrangement is new, so they measure generalisation to new phrasings.
HELDOUT_PHRASINGS: frozenset[tuple[str, str]] = frozenset(
    {("in_colour", "against"), ("colour_first", "prefix"), ("coloured", "with"), ("adjectives", "suffix")}
)
PHRASING_MODES = ("train", "heldout")
#: Probability that a free phrasing leaves out each optional attribute.
DROP_SIZE, DROP_POSITION, DROP_BACKGROUND = 0.4, 0.4, 0.25


def _phrasing_pairs(mode: str) -> list[tuple[str, str]]:
    pairs = [(o, b) for o in OBJECT_FORMS for b in BACKGROUND_FORMS]
    if mode == "train":
        return [p for p in pairs if p not in HELDOUT_PHRASINGS]
    if mode == "heldout":
        return sorted(HELDOUT_PHRASINGS)
    raise ValueError(f"phrasing mode must be one of {PHRASING_MODES}, got {mode!r}")


def free_caption(scene: Scene, rng: np.random.Generator, mode: str = "train") -> str:
    """``scene`` said in one of many phrasings: size, position and background each left out
    at random (a held-out phrasing always keeps the background, which it is scored on), words
    reordered and paraphrased, objects in either order.

    ``mode="train"`` never produces a :data:`HELDOUT_PHRASINGS` arrangement; ``"heldout"``
    produces only those, and never a text that training could produce. :func:`parse_caption` reads every phrasing back to the attributes it
    asks for (``None`` for one left out).
    """
    pairs = _phrasing_pairs(mode)
    obj_form, bg_form = pairs[int(rng.integers(len(pairs)))]
    pos_form = list(POSITION_FORMS)[int(rng.integers(len(POSITION_FORMS)))]
    # without a size these two forms read alike, and training drops sizes from both
    keep_size = rng.random() >= DROP_SIZE or (mode == "heldout" and obj_form in ("adjectives", "colour_first"))
    keep_pos = rng.random() >= DROP_POSITION
    keep_bg = mode == "heldout" or rng.random() >= DROP_BACKGROUND
    phrases = []
    for i in rng.permutation(len(scene.objects)):
        o = scene.objects[int(i)]
        words = OBJECT_FORMS[obj_form].format(size=o.size if keep_size else "", colour=o.colour, shape=o.shape)
        words = " ".join(words.split())
        obj = f"{'an' if words[0] in 'aeiou' else 'a'} {words}"
        if keep_pos:
            wordings = POSITION_WORDINGS[o.position]
            pos = wordings[int(rng.integers(len(wordings)))]
            obj = POSITION_FORMS[pos_form].format(obj=obj, pos=pos)
        phrases.append(obj)
    body = " and ".join(phrases)
    return BACKGROUND_FORMS[bg_form].format(body=body, bg=scene.background) if keep_bg else body


_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                   "lower": "bottom", "center": "center", "middle": "center"}


def _parse_free(text: str) -> ParsedCaption:
    words = re.findall(r"[a-z]+", text)
    background = next((w for w in words if w in BACKGROUNDS), None)
    objects = []
    for segment in re.split(r"\band\b", text):
        ws = re.findall(r"[a-z]+", segment)
        shapes = [w for w in ws if w in SHAPES]
        if len(shapes) != 1:
            continue
        objects.append((
            shapes[0],
            next((w for w in ws if w in COLOURS), None),
            next((w for w in ws if w in SIZES), None),
            next((_POSITION_WORDS[w] for w in ws if w in _POSITION_WORDS), None),
        ))
    return ParsedCaption(background=background, objects=tuple(objects))
