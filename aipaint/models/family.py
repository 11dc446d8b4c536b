"""Model families: what a plugin implements to teach aipaint a kind of model.

A family (:class:`ModelFamily`) recognises weights and loads them into a
:class:`GenerativeModel`: the one object the pipeline, the CLI and the HTTP API drive, for
every family alike. A model declares its :attr:`GenerativeModel.capabilities`; asking it
for anything else is an :class:`aipaint.errors.UnsupportedFeature` naming the family and
the feature, raised before any work (:func:`require_capabilities`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import ModelLoadError, UnsupportedFeature

if TYPE_CHECKING:
    from collections.abc import Callable

    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.plugin.host import PluginHost

CAPABILITIES: dict[str, str] = {
    "txt2img": "text to image",
    "img2img": "image to image",
    "inpaint": "inpainting",
    "outpaint": "outpainting",
    "variations": "image variations",
    "blend": "image blends",
    "refiner": "a refiner hand-off",
    "adapters": "adapter units (ControlNet, LoRA units, …)",
}
"""Every capability a model can declare, with the words errors use for it."""


class GenerativeModel:
    """What :meth:`ModelFamily.load` returns: a loaded model that runs generation requests.

    Subclasses set ``family``, ``name``, ``defaults`` (an :class:`aipaint.models.latent.ModelDefaults`)
    and ``capabilities`` (names from :data:`CAPABILITIES`), and implement :meth:`generate`.
    Latent diffusion models (SD 1.5, SDXL, Stable unCLIP) subclass
    :class:`aipaint.models.latent.LatentDiffusionModel`, whose ``generate`` is the core's engine.
    """

    family: str = ""
    name: str = ""
    defaults: Any = None
    capabilities: frozenset[str] = frozenset({"txt2img"})
    runtime: str = "torch"
    device: Any = "cpu"
    #: The zoo card the model was loaded by (its JSON as a dict; empty for a path without a card).
    #: Plugins read their own sections from it, e.g. ``card.get("lora_training")``.
    card: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickling for another process) gets its own job lock when it
        # first runs a job (aipaint.engine.run.job_lock); a lock can be neither copied nor pickled.
        state = self.__dict__.copy()
        state.pop("_job_lock", None)
        return state

    def modules(self) -> dict[str, Any]:
        """The model's torch modules by name (what runtimes put in eval mode, compile or replace)."""
        return {}

    def missing_hint(self, feature: str) -> str:
        """What would give this model ``feature`` (e.g. "load it with prior=…"), for the error
        that says it lacks it; empty when nothing would."""
        return ""

    def generate(
        self,
        request: GenerationRequest,
        *,
        host: PluginHost,
        progress: Callable[[int, int], None] | None = None,
        preview: Callable[[Any], None] | None = None,
    ) -> Result:
        """Run a request the pipeline has checked (typed options, capabilities). ``progress(done,
        total)`` after each step; ``preview`` where the model can show its steps."""
        raise NotImplementedError


def request_features(request: GenerationRequest) -> list[str]:
    """The capabilities ``request`` needs: its mode, and a refiner or adapter units if it has them."""
    features = [request.mode]
    if request.refiner is not None:
        features.append("refiner")
    if request.adapters:
        features.append("adapters")
    return features


def require_capabilities(model: GenerativeModel, request: GenerationRequest) -> None:
    """:class:`UnsupportedFeature` naming the family and the first feature of ``request`` the model lacks."""
    for feature in request_features(request):
        if feature not in model.capabilities:
            can = ", ".join(CAPABILITIES.get(c, c) for c in CAPABILITIES if c in model.capabilities)
            hint = model.missing_hint(feature)
            raise UnsupportedFeature(
                f"{model.family} model {model.name!r} cannot do {CAPABILITIES.get(feature, feature)} ({feature}); "
                f"it can do: {can or 'nothing with what is loaded'}" + (f". {hint}" if hint else "")
            )


def refuse_unused(model: GenerativeModel, request: GenerationRequest, fields: tuple[str, ...]) -> None:
    """:class:`UnsupportedFeature` naming the first of ``fields`` that ``request`` sets away from its
    default although ``model``'s family has no use for it, so no setting is silently ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(request)}
    for name in fields:
        value = getattr(request, name)
        if value != defaults[name]:
            raise UnsupportedFeature(
                f"{model.family} model {model.name!r} does not use {name} (given {value!r}); leave it unset"
            )


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, after the zoo and the hub have been resolved to a path.

    ``kind`` is ``"folder"`` (diffusers layout) or ``"file"`` (a single checkpoint).
    ``card`` is the zoo card, when the source came from the zoo.
    """

    path: Path
    kind: str
    name: str
    card: dict[str, Any] | None = None
    allow_pickle: bool = False

    def model_index(self) -> dict[str, Any]:
        """The folder's ``model_index.json`` (empty for files or folders without one)."""
        if self.kind != "folder" or not (self.path / "model_index.json").is_file():
            return {}
        return read_model_index(self.path)

    def checkpoint_keys(self) -> list[str]:
        """The tensor names of a single-file checkpoint, read without loading tensors."""
        if self.kind != "file":
            return []
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(self.path), framework="pt") as f:
                    return list(f.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise ModelLoadError(f"{self.path} is not a readable safetensors file: {exc}") from exc
        from aipaint.models.weights import load_state_dict

        return list(load_state_dict(self.path, allow_pickle=self.allow_pickle))


def read_model_index(path: Path) -> dict[str, Any]:
    """A diffusers folder's ``model_index.json``; :class:`ModelLoadError` when it has none or it
    is not a readable JSON object."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers folder: it has no model_index.json")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"{index} is not readable JSON ({exc}); repair or re-download the model folder") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{index} must hold a JSON object naming the pipeline's parts, not {type(data).__name__}")
    return data


def require_subfolders(path: Path, parts: tuple[str, ...], what: str) -> None:
    """:class:`ModelLoadError` naming the first of ``parts`` that ``path`` lacks (``what`` the
    folder should be, e.g. "a DeepFloyd IF stage I folder")."""
    for part in parts:
        if not (Path(path) / part).is_dir():
            raise ModelLoadError(f"{path} is not {what}: it has no {part}/ sub-folder")


def read_scheduler_config(path: Path, sub: str) -> dict[str, Any]:
    """The scheduler config in a diffusers folder's sub-folder ``sub`` (e.g. ``scheduler``)."""
    config = Path(path) / sub / "scheduler_config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{config} is not readable ({exc}); repair or re-download the model folder") from exc


def make_scheduler(config: dict[str, Any]) -> Any:
    """The diffusers scheduler ``config`` names (its ``_class_name``), exactly as configured: for
    families that run their own loop (the latent loop builds its samplers in engine/plans.py)."""
    import diffusers

    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(f"the scheduler config names {name!r}, which is not a diffusers scheduler")
    return cls.from_config(config)


@dataclass(frozen=True)
class LoadOptions:
    device: str = "cpu"
    dtype: str = "float32"
    runtime: str = "torch"
    config: Path | None = None  # a diffusers config folder for single-file checkpoints
    extra: dict[str, Any] = field(default_factory=dict)


class ModelFamily:
    """Base class of model families. Subclass it in a plugin and register an instance.

    ``name`` is what users type (``--family sd15``); ``aliases`` are other accepted
    names; ``default_size`` is ``(width, height)``; ``default_config`` names the zoo
    config folder used for offline single-file loading; ``base_models`` and
    ``air_ecosystem`` say how model sites name the family's files.
    """

    name: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    default_size: tuple[int, int] = (512, 512)
    #: Regular expressions (matched, case-insensitive, anywhere in the text) for the base-model
    #: names model sites give files made for this family: Civitai's ``baseModel`` ("SD 1.5",
    #: "SDXL 1.0", "Pony"), a Hugging Face card's ``base_model`` repo id. :mod:`aipaint.sources`
    #: reads them to tell which family a downloaded checkpoint or LoRA is for.
    base_models: tuple[str, ...] = ()
    #: The ecosystem part of a Civitai AIR (``urn:air:ECOSYSTEM:…``) of this family's files ("sd1").
    air_ecosystem: str = ""
    #: The family's own settings that ``aipaint.load(..., name=value)`` (CLI ``--load-option
    #: name=value``) passes in ``LoadOptions.extra``, e.g. SD 3's ``t5``. Any other name is refused
    #: before loading, so a typo is never silently ignored. ``None`` (not declared) skips the check.
    load_options: tuple[str, ...] | None = None

    def identify(self, source: ModelSource) -> bool:
        """Return True when this family can load ``source``. Be conservative."""
        return False

    def load(self, source: ModelSource, options: LoadOptions) -> GenerativeModel:
        """Load ``source`` into a model of this family."""
        raise NotImplementedError
