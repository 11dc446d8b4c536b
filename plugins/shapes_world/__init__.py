"""The shapes world behind the embedded default model ``shapes-tiny``: a plugin of its own.

* :mod:`aipaint_plugins.shapes_world.scene` — scenes, canonical captions and free phrasings, ``parse_caption``, splits.
* :mod:`aipaint_plugins.shapes_world.render` — 32×32 antialiased renders.
* :mod:`aipaint_plugins.shapes_world.evaluate` — read a (generated) image back and score prompt adherence.
* :mod:`aipaint_plugins.shapes_world.train` — recreate the model: ``python -m aipaint_plugins.shapes_world.train``.
* :mod:`aipaint_plugins.shapes_world.controlnet_train` and ``controlnet_layout`` — the layout ControlNet trained
  on the world's renders, and its evaluation.

It adds one command, ``aipaint eval IMAGE [--caption TEXT]``, which reads a picture of the
world and scores it against a caption.
"""

from __future__ import annotations

import argparse

from aipaint import hookimpl


def cmd_eval(args: argparse.Namespace) -> int:
    from aipaint_plugins.shapes_world.evaluate import adherence, read_scene
    from aipaint_plugins.shapes_world.scene import POSITION_PHRASES

    from aipaint.imageutil import load_image

    image = load_image(args.image)
    reading = read_scene(image)
    print(f"background: {reading.background}")
    for obj in reading.objects:
        print(f"object: a {obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]} "
              f"(centre {obj.cx:.1f},{obj.cy:.1f}; extent {obj.extent:.1f} px)")
    if not reading.objects:
        print("object: none found")
    if args.caption:
        score = adherence(image, args.caption, reading)
        print(f"adherence: {score.score:.3f} ({score.matched}/{score.total} attributes"
              f"{', all correct' if score.all_correct else ''})")
    return 0


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="read a shapes-world image and score it against a caption")
    p.add_argument("image")
    p.add_argument("--caption")
    p.set_defaults(func=cmd_eval)
