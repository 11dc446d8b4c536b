"""aipaint: an open-source Python SDK for AI painting.

>>> import aipaint
>>> pipe = aipaint.load()          # the embedded default model, offline
>>> pipe.txt2img("a big red circle on the left, on a white background", seed=1).save("out.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aipaint.plugin.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "load", "Pipeline", "GenerationRequest", "Result", "create_plugin_host"]

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import create_plugin_host


def load(source: Any = None, **options: Any) -> Pipeline:
    """Load a model (zoo id, diffusers folder, .safetensors file or hub id) into a Pipeline."""
    from aipaint.pipeline import Pipeline

    return Pipeline.load(source, **options)


def __getattr__(name: str) -> Any:
    # Heavy modules (torch, diffusers) load only when used, so `aipaint --help` is quick.
    if name == "Pipeline":
        from aipaint.pipeline import Pipeline

        return Pipeline
    if name == "GenerationRequest":
        from aipaint.api.request import GenerationRequest

        return GenerationRequest
    if name == "Result":
        from aipaint.api.result import Result

        return Result
    if name == "create_plugin_host":
        from aipaint.plugin.host import create_plugin_host

        return create_plugin_host
    raise AttributeError(f"module 'aipaint' has no attribute {name!r}")
