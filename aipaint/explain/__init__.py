"""See inside a diffusion model: the forward process, a generation step by step, cross-attention,
samplers and classifier-free guidance, drawn for the person learning them.

Each view is a function of a loaded :class:`aipaint.Pipeline` and returns an
:class:`ExplainResult` (pictures, numpy data, a labelled contact sheet, matplotlib figures):

>>> import aipaint, aipaint.explain
>>> pipe = aipaint.load()
>>> aipaint.explain.noise(pipe, "circle.png").save("noise.png")
>>> aipaint.explain.denoise(pipe, "a big red circle on the left, on a white background", seed=1).sheet
>>> aipaint.explain.attention(pipe, "a big red circle on the left, on a white background", seed=1).data["words"]

The views: :func:`noise`, :func:`denoise`, :func:`attention`, :func:`samplers`, :func:`cfg`
(docs/explain.md shows each on the embedded model). The command line has the same views as
``aipaint explain VIEW``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExplainResult", "noise", "denoise", "attention", "samplers", "cfg", "record_cross_attention"]

_WHERE = {
    "ExplainResult": "aipaint.explain.common",
    "noise": "aipaint.explain.forward",
    "denoise": "aipaint.explain.reverse",
    "attention": "aipaint.explain.crossattn",
    "record_cross_attention": "aipaint.explain.crossattn",
    "samplers": "aipaint.explain.sampling",
    "cfg": "aipaint.explain.guidance",
}


def __getattr__(name: str) -> Any:
    # torch and diffusers load when a view is first used, not on import.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'aipaint.explain' has no attribute {name!r}")
