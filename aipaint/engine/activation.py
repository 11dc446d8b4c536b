"""Adapters joining one job: who claims which prompt tag and request unit, activated in a stack.

Everything an adapter changes (weight patches, added tokens, attention processors) lives
inside the :class:`contextlib.ExitStack` of the job that activated it and is restored when
the job ends; :func:`aipaint.engine.run.generate` holds the model's job lock meanwhile, so
no other job sees it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aipaint.errors import UnsupportedFeature
from aipaint.plugin.adapters import AdapterContext

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.loop import LoopContributor
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.plugin.host import PluginHost
    from aipaint.prompt import ParsedPrompt


@dataclass
class ActiveAdapters:
    """What the active adapters of one job contribute, together."""

    contributors: list[LoopContributor] = field(default_factory=list)
    infotext: dict[str, str] = field(default_factory=dict)
    rewrites: list[Callable[[str], str]] = field(default_factory=list)

    def rewrite(self) -> Callable[[str], str] | None:
        """The adapters' text rewrites chained, or None when there are none."""
        if not self.rewrites:
            return None
        rewrites = list(self.rewrites)

        def rewrite(text: str) -> str:
            for fn in rewrites:
                text = fn(text)
            return text

        return rewrite


def adapter_defaults(model: LatentDiffusionModel, request: GenerationRequest, host: PluginHost) -> dict[str, Any]:
    """What the request's adapters ask for where the request leaves a setting unset (a few-step
    LoRA's sampler, steps, CFG): each adapter with ``request_defaults`` whose tags or units the
    request uses is asked; the first to set a field wins. Fields the request sets are kept."""
    from aipaint.plugin.adapters import REQUEST_DEFAULT_FIELDS
    from aipaint.prompt import parse_prompt

    registry = host.registry.adapters
    specs = [spec for spec in registry if spec.request_defaults is not None]
    if not specs or ("<" not in request.prompt and not request.adapters):  # no tags, no units: nothing to ask
        return {}
    parsed = parse_prompt(request.prompt)
    tags: tuple[Any, ...] = (*parsed.loras, *parsed.extra_networks)
    found: dict[str, Any] = {}
    for spec in specs:
        refs = tuple(r for r in tags if getattr(r, "kind", "lora") in spec.prompt_tags)
        units = tuple(u for u in request.adapters if registry.get(u.kind) is spec) if request.adapters else ()
        if not refs and not units:
            continue
        context = AdapterContext(model, request, refs, units, request.height or 0, request.width or 0, host=host)
        for name, value in (spec.request_defaults(context) or {}).items():  # type: ignore[misc]
            if name not in REQUEST_DEFAULT_FIELDS:
                raise ValueError(f"adapter {spec.name!r} asked for a default of {name!r}; it may set "
                                 f"{', '.join(REQUEST_DEFAULT_FIELDS)}")
            if getattr(request, name) is None and name not in found:
                found[name] = value
    return found


def activate_adapters(
    model: LatentDiffusionModel, request: GenerationRequest, parsed: ParsedPrompt, host: PluginHost, stack: ExitStack
) -> ActiveAdapters:
    """Activate every adapter the request needs (its prompt tags, its units, or an adapter's own
    ``wants``) inside ``stack``. An unclaimed LoRA tag is an error; another unclaimed tag kind
    is removed with a warning, as A1111 does."""
    registry = host.registry.adapters
    tags: tuple[Any, ...] = (*parsed.loras, *parsed.extra_networks)
    claimed: set[int] = set()
    active = ActiveAdapters()
    for spec in registry:
        refs = tuple(r for r in tags if getattr(r, "kind", "lora") in spec.prompt_tags)
        units = tuple(u for u in request.adapters if registry.get(u.kind) is spec) if request.adapters else ()
        context = AdapterContext(model, request, refs, units, request.height, request.width, host=host)
        if not refs and not units and not (spec.wants is not None and spec.wants(context)):
            continue
        claimed.update(id(r) for r in refs)
        activation = stack.enter_context(spec.activate(context))
        active.contributors.extend(activation.contributors)
        active.infotext.update(activation.infotext)
        if activation.rewrite_text is not None:
            active.rewrites.append(activation.rewrite_text)
    unclaimed = [r for r in parsed.loras if id(r) not in claimed]
    if unclaimed:
        names = ", ".join(f"<lora:{r.name}>" for r in unclaimed)
        raise UnsupportedFeature(
            f"the prompt uses {names}, but no installed adapter handles LoRA tags; "
            "install a LoRA adapter plugin or remove the tag"
        )
    ignored = [r for r in parsed.extra_networks if id(r) not in claimed]
    if ignored:
        from aipaint.prompt import PromptWarning

        kinds = ", ".join(dict.fromkeys(repr(r.kind) for r in ignored))
        warnings.warn(
            f"aipaint: the prompt's {', '.join(r.tag for r in ignored)} {'tag was' if len(ignored) == 1 else 'tags were'} "
            f"removed and ignored: no installed adapter handles {kinds} tags (A1111 skips them too; "
            "`aipaint plugins` lists the adapters)",
            PromptWarning,
            stacklevel=4,
        )
    return active
