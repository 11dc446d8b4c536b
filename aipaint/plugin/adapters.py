"""Adapters (LoRA, ControlNet, textual inversion, …): the registration record.

An adapter joins a generation when the prompt carries one of its tags (``<lora:…>``)
or the request lists a unit for it (``AdapterUnit("controlnet", {...})``). While
active it may patch weights (reversibly: restore them when the context exits) and add
:class:`aipaint.engine.loop.LoopContributor` objects to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.loop import LoopContributor
    from aipaint.models.latent import LatentDiffusionModel


@dataclass(frozen=True)
class AdapterUnit:
    """One use of an adapter requested through the API, e.g. ``AdapterUnit("lora", {"name": "x", "weight": 0.8})``."""

    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterContext:
    """What an adapter sees when a generation starts."""

    model: LatentDiffusionModel
    request: GenerationRequest
    prompt_refs: tuple[Any, ...]  # the prompt's tags of this adapter's prompt_tags kinds: LoraRef, ExtraNetworkRef
    units: tuple[AdapterUnit, ...]  # the request's units of this adapter's kind
    height: int = 0
    width: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    host: Any = None  # the aipaint.plugin.host.PluginHost of the pipeline (its registry: preprocessors, …)


@dataclass
class AdapterActivation:
    """What an active adapter contributes: loop contributors and infotext entries."""

    contributors: list[LoopContributor] = field(default_factory=list)
    infotext: dict[str, str] = field(default_factory=dict)
    # Applied to every resolved prompt text (positive and negative) just before it is encoded,
    # e.g. textual inversion spelling an embedding's name as its added tokens. Not recorded:
    # the infotext keeps the prompt as the user wrote it.
    rewrite_text: Callable[[str], str] | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as registered by a plugin.

    ``activate(context)`` returns a context manager yielding an :class:`AdapterActivation`;
    everything it changed must be restored when the context exits, even on error.
    ``prompt_tags`` lists the prompt tag kinds it consumes (``("lora", "lyco")``; any other kind,
    such as ``"hypernet"``, reaches it as :class:`aipaint.prompt.ExtraNetworkRef`). A tag of a kind
    no adapter consumes is ignored with a :class:`aipaint.prompt.PromptWarning`, except LoRA tags,
    which are an error.
    """

    name: str
    activate: Callable[[AdapterContext], AbstractContextManager[AdapterActivation]]
    prompt_tags: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    # For adapters that join without a tag or a unit (textual inversion joins when a prompt
    # names one of its embeddings): called with the context of each generation.
    wants: Callable[[AdapterContext], bool] | None = None
    # Settings the adapter asks for when the request leaves them unset (None), before the
    # model's defaults fill the rest: a few-step LoRA's sampler, schedule, steps and CFG scale.
    # Called with the job's context (its tags and units) while the request is settled; returns
    # a mapping of REQUEST_DEFAULT_FIELDS names to values.
    request_defaults: Callable[[AdapterContext], Mapping[str, Any]] | None = None


#: The request fields an adapter's ``request_defaults`` may fill.
REQUEST_DEFAULT_FIELDS = ("steps", "cfg_scale", "sampler", "schedule")
