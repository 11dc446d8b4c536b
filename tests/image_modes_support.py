"""Helpers shared by the img2img, inpainting, outpainting and variation-seed tests."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def noise_image(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def steps_reported(pipe, method: str, *args, **kwargs) -> tuple[int, object]:
    """Run ``pipe.method`` and return (the loop's step count from the progress callback, the result)."""
    calls: list[tuple[int, int]] = []
    result = getattr(pipe, method)(*args, progress=lambda done, total: calls.append((done, total)), **kwargs)
    return (calls[-1][1] if calls else 0), result


def load_embedded(plugin_host):
    """The embedded model, or a skip that says why it is missing."""
    import aipaint
    from aipaint.models.zoo import zoo_root

    if not (zoo_root() / "models" / "shapes-tiny" / "unet").is_dir():
        pytest.skip("the embedded model has not landed yet: zoo/models/shapes-tiny/unet does not exist")
    return aipaint.load(host=plugin_host)
