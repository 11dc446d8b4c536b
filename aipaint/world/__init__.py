"""The shapes world behind the embedded default model ``shapes-tiny``.

* :mod:`aipaint.world.scene` — scenes, canonical captions, ``parse_caption``, splits.
* :mod:`aipaint.world.render` — 32×32 antialiased renders.
* :mod:`aipaint.world.evaluate` — read a (generated) image back and score prompt adherence.
* :mod:`aipaint.world.train` — recreate the model: ``python -m aipaint.world.train``.
"""
from aipaint.world.scene import (  # noqa: F401
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COLOUR,
    HELDOUT_COMBOS,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    parse_caption,
    random_scene,
)
