"""Running a chain of post-processors after a generation or on any image, in the chosen order.

A processor records what it did as A1111 infotext entries (``Hires upscale``,
``ADetailer model``, …); the chain merges those into the image's PNG parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aipaint.errors import UnsupportedFeature
from aipaint.plugin.host import default_host
from aipaint.plugin.postprocess import PostProcessOutput, PostStep, as_steps, check_chain, merge_infotext

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import PluginHost


def run_postprocessors(
    image: Image.Image,
    steps: Sequence[PostStep | str | tuple[str, dict[str, Any]]],
    pipeline: Pipeline | None = None,
    *,
    host: PluginHost | None = None,
    request: Any = None,
) -> PostProcessOutput:
    """Run post-processors on one image, in order; each sees the previous one's output.

    Steps are :class:`PostStep` objects, ``"name:k=v"`` strings or ``(name, options)``
    pairs. Infotext entries are merged (a later step overwrites an earlier one's key).
    """
    host = host or (pipeline.host if pipeline is not None else default_host())
    resolved = check_chain(as_steps(steps), host)  # the whole chain, before running any of it
    for spec, _ in resolved:
        if spec.needs_model and pipeline is None:
            raise UnsupportedFeature(f"post-processor {spec.name!r} diffuses with a model: load one (-m/--model) first")
    info: dict[str, str] = {}
    for spec, step in resolved:
        options = dict(step.options)
        if request is not None:
            options.setdefault("request", request)
        output = spec.run(image, options, pipeline)
        image = output.image
        info.update(output.infotext)
    return PostProcessOutput(image, info)


def postprocess_result(
    result: Result,
    steps: Sequence[PostStep | str | tuple[str, dict[str, Any]]],
    pipeline: Pipeline | None = None,
    *,
    host: PluginHost | None = None,
) -> Result:
    """Run a chain on every image of a generation; each image keeps its own seed and infotext."""
    images, infotexts = [], []
    for index, (image, seed) in enumerate(zip(result.images, result.seeds)):
        request = result.request
        if request is not None and dataclasses.is_dataclass(request):
            request = dataclasses.replace(request, seed=seed, batch_size=1)
        output = run_postprocessors(image, steps, pipeline, host=host, request=request)
        images.append(output.image)
        infotexts.append(merge_infotext(result.infotexts[index], output.infotext))
    return dataclasses.replace(result, images=images, infotexts=infotexts)
