"""The shapes world as ControlNet data, and the measurement of control.

The embedded model's layout ControlNet (``shapes-tiny-controlnet-layout``) is trained on
the **Canny edges of the ground-truth render** of a scene (the built-in ``canny``
preprocessor, default thresholds): the control image says where each object is and its
outline; the prompt says what it is. ``position_accuracy`` generates one image per scene
from a prompt *without* positions and reads the result back with
:func:`aipaint_plugins.shapes_world.evaluate.read_scene`: a case counts when every object of the scene is
found at its position (left/right/top/bottom/center).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import Scene, random_scene
from PIL import Image

MODEL_ID = "shapes-tiny-controlnet-layout"
PREPROCESSOR = "canny"


def layout_map(scene: Scene) -> Image.Image:
    """What the ControlNet sees: the registered ``canny`` preprocessor's map (white edges on black, its
    default thresholds) of the scene's 32×32 render, as a user's ControlNet unit makes it."""
    from aipaint.plugin.host import default_host

    return default_host().registry.preprocessors.get(PREPROCESSOR).apply(render(scene))


def prompt_without_position(scene: Scene) -> str:
    """``"a big red circle, on a white background"``: the caption minus where things are."""
    objects = " and ".join(f"a {o.size} {o.colour} {o.shape}" for o in scene.objects)
    return f"{objects}, on a {scene.background} background"


def layout_cases(n: int, seed: int = 0, *, n_objects: int | None = 1, split: str = "train") -> list[Scene]:
    """``n`` random scenes; positions are balanced by the world's sampler (five anchors)."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, split, n_objects) for _ in range(n)]


@dataclass(frozen=True)
class CaseResult:
    prompt: str
    wanted: tuple[str, ...]  # positions of the scene's objects
    found: tuple[str, ...]  # positions of the objects read from the image
    ok: bool


def placed_right(scene: Scene, image: Image.Image) -> tuple[bool, tuple[str, ...]]:
    """Every object of ``scene`` has a detected object at its position (the largest
    detections first, as many as the scene has objects)."""
    from aipaint_plugins.shapes_world.evaluate import read_scene

    reading = read_scene(image)
    largest = sorted(reading.objects, key=lambda o: -o.area)[: len(scene.objects)]
    found = tuple(o.position for o in largest)
    wanted = sorted(o.position for o in scene.objects)
    return sorted(found) == wanted, found


def evaluate(pipe: Any, scenes: list[Scene], *, use_controlnet: bool, model: Any = MODEL_ID, seed: int = 0,
             weight: float = 1.0, **params: Any) -> list[CaseResult]:
    """Generate one image per scene (seed ``seed + i``) and check where its objects are."""
    from aipaint.plugin.adapters import AdapterUnit

    results = []
    for i, scene in enumerate(scenes):
        prompt = prompt_without_position(scene)
        units = ()
        if use_controlnet:
            units = (AdapterUnit("controlnet", {"model": model, "image": render(scene), "preprocessor": PREPROCESSOR,
                                                "weight": weight}),)
        image = pipe.txt2img(prompt, seed=seed + i, adapters=units, **params).image
        ok, found = placed_right(scene, image)
        results.append(CaseResult(prompt, tuple(o.position for o in scene.objects), found, ok))
    return results


def position_accuracy(pipe: Any, scenes: list[Scene], *, use_controlnet: bool, **options: Any) -> float:
    results = evaluate(pipe, scenes, use_controlnet=use_controlnet, **options)
    return sum(r.ok for r in results) / max(1, len(results))
