"""Turning what a user names (zoo id, folder, file, hub id) into a loaded model."""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aipaint.errors import (
    AipaintError,
    AipaintWarning,
    InvalidParameter,
    ModelLoadError,
    UnknownName,
    shown,
)
from aipaint.models import zoo
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource
from aipaint.models.latent import LatentDiffusionModel, ModelDefaults
from aipaint.models.weights import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    check_pickle_opt_in,
    load_state_dict,
    pickle_load_error,
)
from aipaint.plugin.host import PluginHost

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_ID_MAX = 96  # the Hugging Face Hub's longest repo id


def refuse_missing_weights(path: Path, config: Path | str, components: dict[str, Any], family: str) -> None:
    """Raise when a single-file load left any weight without data.

    diffusers' ``from_single_file`` builds modules empty (on ``meta``) and fills in what the
    file has, so a weight the file lacks stays empty instead of failing the load; the first
    use would then crash far from the cause. ``components`` maps names to modules (or None).
    """
    for name, module in components.items():
        missing = [key for key, tensor in module.state_dict().items() if tensor.is_meta] if module is not None else []
        if missing:
            raise ModelLoadError(
                f"{path.name} lacks {len(missing)} weight(s) of the {family} {name} "
                f"(e.g. {', '.join(missing[:3])}): the file is incomplete, or its {name} does not match "
                f"the config {config}; pass config= a folder that describes this checkpoint"
            )


def resolve_source(source: str | Path | None, *, allow_pickle: bool = False) -> ModelSource:
    """Find the model a user named: zoo id, existing path, a source :mod:`aipaint.sources` reads
    (Civitai, a Hugging Face file link, a URL with its sha256, a hash), or hub id (in that order)."""
    check_pickle_opt_in(allow_pickle)
    if source is None:
        source = zoo.DEFAULT_MODEL
    text = str(source)
    card = zoo.find(text) if isinstance(source, str) else None
    if card is not None:
        path = zoo.fetch(card)
        return ModelSource(path, "folder" if path.is_dir() else "file", card.id, card.data, allow_pickle)
    path = Path(text)
    try:
        path = path.expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError):  # too long to be a path (ENAMETOOLONG), "~nobody/…" (no such user): no file
        is_dir = is_file = False
    if is_dir:
        return ModelSource(path, "folder", path.name, None, allow_pickle)
    if is_file:
        if path.suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
            raise ModelLoadError(f"{path.name}: unknown checkpoint format {path.suffix!r}; expected .safetensors")
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            load_state_dict(path, allow_pickle=False)  # raises the explanation
        return ModelSource(path, "file", path.stem, None, allow_pickle)
    from aipaint import sources

    if sources.is_source(text):  # a Civitai link or AIR, a Hugging Face file link, a URL, a hash: installed once
        path = sources.ensure(text, kind="checkpoint", allow_pickle=allow_pickle)
        return ModelSource(path, "folder" if path.is_dir() else "file", path.stem, None, allow_pickle)
    if len(text) <= _HUB_ID_MAX and _HUB_ID.match(text) and not text.endswith((".safetensors",) + PICKLE_SUFFIXES):
        folder = zoo.download_from_hub(text)
        return ModelSource(folder, "folder", text, None, allow_pickle)
    raise ModelLoadError(
        f"no model {shown(text)}: it is not a zoo id (see `aipaint zoo`), not an existing file or folder, "
        "and not a Hugging Face Hub id of the form org/name"
    )


def _broken_plugin(owner: str, where: str, problem: str) -> None:
    warnings.warn(f"aipaint plugin {owner!r} {problem} in {where}; it was skipped while identifying the model",
                  AipaintWarning, stacklevel=3)


def identify_family(source: ModelSource, host: PluginHost) -> ModelFamily:
    """The family that loads ``source``: the zoo card's, else the first plugin that claims it
    through ``identify_model_family``, else the first family whose ``identify`` says yes.

    A plugin that crashes or claims an unregistered family is named in a warning and skipped,
    so one broken plugin cannot stop every model from loading. Errors about the source itself
    (:class:`~aipaint.errors.AipaintError`, such as an unreadable file) are raised as they are.
    """
    registry = host.registry.families
    if source.card and source.card.get("family"):
        return registry.get(source.card["family"])
    for owner, call in host.implementations("identify_model_family"):
        try:
            claimed = call(source=source)
        except AipaintError:
            raise
        except Exception as exc:
            _broken_plugin(owner, "identify_model_family", f"raised {exc!r}")
            continue
        if claimed is None:
            continue
        if claimed not in registry:
            _broken_plugin(owner, "identify_model_family", f"claimed the unregistered family {claimed!r}")
            continue
        return registry.get(claimed)
    for family in registry:
        try:
            if family.identify(source):
                return family
        except AipaintError:
            raise
        except Exception as exc:
            _broken_plugin(registry.owners[family.name], f"{type(family).__name__}.identify()", f"raised {exc!r}")
    raise ModelLoadError(
        f"no installed model family recognises {source.path}; installed families: "
        f"{', '.join(registry.names()) or 'none'}. Pass family=... if you know it"
    )


@contextlib.contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """No "Loading weights" bars from transformers or diffusers while a model loads (aipaint shows
    its own progress, and a library should not write to the terminal unasked); the caller's
    setting is restored afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in enabled:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in enabled:
            lib.enable_progress_bar()


def load_model(
    source: str | Path | None = None,
    *,
    host: PluginHost,
    family: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    runtime: str = "torch",
    allow_pickle: bool = False,
    config: str | Path | None = None,
    **extra: Any,
) -> LatentDiffusionModel:
    # Names first: a typo must cost neither a download nor a load.
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UnknownName("dtype", dtype, ["float32", "float16", "bfloat16"])
    named_family = host.registry.families.get(family) if family else None
    runtime_spec = host.registry.runtimes.get(runtime)
    problem = runtime_spec.unavailable()
    if problem:
        raise ModelLoadError(f"runtime {runtime_spec.name!r} cannot run here: {problem}")
    resolved = resolve_source(source, allow_pickle=allow_pickle)
    chosen = named_family or identify_family(resolved, host)
    if chosen.load_options is not None:
        unknown = sorted(set(extra) - {"runtime_options"} - set(chosen.load_options))
        if unknown:
            accepted = ", ".join(chosen.load_options) or "none"
            raise InvalidParameter(unknown[0], extra[unknown[0]],
                                   f"not a load option of the {chosen.name} family (its own: {accepted}; runtime "
                                   "settings go in runtime_options / --runtime-option)")
    runtime_options = dict(extra.get("runtime_options", {}))
    weights_device = runtime_spec.weights_device(device, runtime_options) if runtime_spec.weights_device else device
    options = LoadOptions(device=weights_device, dtype=dtype, runtime=runtime, config=Path(config) if config else None,
                          extra=extra)
    try:
        with library_progress_bars_off():
            model = chosen.load(resolved, options)
    except pickle.UnpicklingError as exc:  # a pickled file in a folder, which diffusers or transformers read
        raise pickle_load_error(f"a pickled weights file of {resolved.path}", exc) from exc
    model.card = dict(resolved.card or {})
    if resolved.card:
        defaults = {k: v for k, v in resolved.card.get("defaults", {}).items() if k in ModelDefaults.__dataclass_fields__}
        model.defaults = ModelDefaults(**{**model.defaults.__dict__, **defaults})
        model.name = resolved.card.get("name", model.name)
    if weights_device != device:  # the weights stay where they were loaded; the model computes on ``device``
        import torch

        model.device = torch.device(device)
    runtime_spec.prepare(model, runtime_options)
    model.runtime = runtime_spec.name
    return model
