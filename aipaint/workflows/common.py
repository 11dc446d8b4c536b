"""What the workflows share: a request's dynamic prompt resolved into the requests to run,
one run with its post-processing chain, and the template recorded in the PNG parameters."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint.errors import AipaintWarning, InvalidParameter
from aipaint.prompt.wildcards import DEFAULT_MAX_PROMPTS, MAX_PROMPTS, DynamicPrompts

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

TEMPLATE_KEY = "Template"
NEGATIVE_TEMPLATE_KEY = "Negative Template"
"""The PNG parameters the sd-dynamic-prompts extension records the unresolved prompts under."""


@dataclass(frozen=True)
class PromptJob:
    """A request ready to run (its prompts resolved, its seed fixed), and the templates they came from
    (None where the prompt had no dynamic syntax)."""

    request: GenerationRequest
    template: str | None = None
    negative_template: str | None = None

    @property
    def recorded(self) -> dict[str, str]:
        """The PNG parameters that record the templates."""
        entries = {}
        if self.template is not None:
            entries[TEMPLATE_KEY] = self.template
        if self.negative_template is not None:
            entries[NEGATIVE_TEMPLATE_KEY] = self.negative_template
        return entries


def check_max_prompts(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROMPTS:
        raise InvalidParameter("max_prompts", value, f"must be an integer from 1 to {MAX_PROMPTS}")
    return value


def resolve_request(request: GenerationRequest, dynamic: DynamicPrompts | None, *, combinatorial: bool = False,
                    max_prompts: int = DEFAULT_MAX_PROMPTS) -> list[PromptJob]:
    """The jobs one request makes. Without ``dynamic`` it is the request itself. Otherwise the
    seed is fixed first (a random one when it is -1), then the prompt and the negative prompt
    are resolved: at random from that seed, or every combination (prompt x negative prompt),
    at most ``max_prompts`` (a warning says when there were more)."""
    if dynamic is None:
        return [PromptJob(request)]
    request = request.with_seed()
    prompt, negative = request.prompt, request.negative_prompt
    if combinatorial:
        max_prompts = check_max_prompts(max_prompts)
        prompts = dynamic.expand(prompt, max_prompts + 1)  # one more than wanted says whether there are more
        negatives = dynamic.expand(negative, max_prompts + 1, what="negative prompt")
        pairs = list(itertools.islice(itertools.product(prompts, negatives), max_prompts + 1))
        if len(pairs) > max_prompts:
            warnings.warn(f"the prompt makes more than {max_prompts} combinations; only the first {max_prompts} are "
                          "generated (raise the limit with --max-prompts, max_prompts=)", AipaintWarning, stacklevel=2)
            pairs = pairs[:max_prompts]
    else:
        pairs = [(dynamic.resolve(prompt, request.seed),
                  dynamic.resolve(negative, request.seed, what="negative prompt"))]
    return [PromptJob(dataclasses.replace(request, prompt=p, negative_prompt=n),
                      prompt if p != prompt else None, negative if n != negative else None) for p, n in pairs]


def run_job(pipe: Pipeline, job: PromptJob, *, post: Sequence[Any] = (),
            progress: Callable[[int, int], None] | None = None, preview: Callable[[Any], None] | None = None) -> Result:
    """Run one job on ``pipe``, then the post-processing chain ``post``; the templates join the
    PNG parameters (``Template``, ``Negative Template``) of every image."""
    result = pipe.generate(job.request, progress=progress, preview=preview)
    if post:
        from aipaint.engine.postprocessing import postprocess_result

        result = postprocess_result(result, post, pipe)
    return record_entries(result, job.recorded)


def record_entries(result: Result, entries: dict[str, str]) -> Result:
    """``result`` with ``entries`` added to the PNG parameters of every image (before ``Version``)."""
    if not entries:
        return result
    from aipaint.plugin.postprocess import merge_infotext

    return dataclasses.replace(result, infotexts=[merge_infotext(text, entries) for text in result.infotexts])
