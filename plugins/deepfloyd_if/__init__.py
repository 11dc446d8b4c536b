"""The DeepFloyd IF family: a pixel-space cascade conditioned on T5 text embeddings.

IF does not fit the latent loop: its model (:class:`aipaint_plugins.deepfloyd_if.model.IFCascade`)
runs its own loop (:mod:`aipaint_plugins.deepfloyd_if.loop`) from the core's request, driven
by the same :class:`aipaint.Pipeline` as every family; it can do ``txt2img``. A cascade is
loaded from its stage I folder; stages II and III come from the zoo card's ``stages``
(downloaded like any model) or from the ``stage2=`` / ``stage3=`` load options (local folders)::

    pipe = aipaint.load("path/IF-I-XL-v1.0", stage2="path/IF-II-L-v1.0", stage3="path/sd-x4-upscaler")
    pipe.txt2img("a corgi", steps=50, options={"if": {"stage2_steps": 30}})

The later stages' settings are the ``if`` options (:mod:`aipaint_plugins.deepfloyd_if.options`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource

if TYPE_CHECKING:
    from aipaint_plugins.deepfloyd_if.model import IFCascade


class DeepFloydIF(ModelFamily):
    name = "deepfloyd-if"
    load_options = ("stage2", "stage3")
    aliases = ("if", "deepfloyd", "deepfloyd_if")
    base_models = (r"deepfloyd", r"^if-i")
    description = "DeepFloyd IF: T5-conditioned pixel cascade (64 px, ×4 super-resolution, ×4 upscaler)"
    default_size = (64, 64)

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and source.model_index().get("_class_name") == "IFPipeline"

    def load(self, source: ModelSource, options: LoadOptions) -> IFCascade:
        import torch
        from aipaint_plugins.deepfloyd_if.model import IFCascade, load_stage, load_text_encoder

        if options.runtime != "torch":
            raise UnsupportedFeature(f"DeepFloyd IF runs on the torch runtime only, not {options.runtime!r}")
        if source.kind != "folder":
            raise ModelLoadError(f"{source.path.name}: DeepFloyd IF loads from diffusers folders (one per stage), not single files")
        dtype = getattr(torch, options.dtype)
        safetensors_only = None if source.allow_pickle else True
        text_encoder, tokenizer = load_text_encoder(source.path, dtype, safetensors_only)
        stages = [load_stage(source.path, dtype, safetensors_only, 0)]
        if stages[0].kind != "base":
            raise ModelLoadError(f"{source.path} is not a stage I (IFPipeline) folder")
        for position, path in enumerate(self._later_stages(source, options), start=1):
            stages.append(load_stage(path, dtype, safetensors_only, position))
        kinds = [stage.kind for stage in stages]
        if kinds not in (["base"], ["base", "super_resolution"], ["base", "super_resolution", "upscaler"]):
            raise ModelLoadError(f"an IF cascade runs stage I, then stage II, then an upscaler; got {' → '.join(kinds)}")
        model = IFCascade(
            family=self.name,
            name=source.name,
            text_encoder=text_encoder.to(options.device),
            tokenizer=tokenizer,
            stages=stages,
            source_path=source.path,
            device=options.device,
            dtype=dtype,
        )
        for stage in stages:
            for module in (stage.unet, stage.vae, stage.text_encoder):
                if module is not None:
                    module.to(options.device)
        for module in model.modules().values():
            module.eval().requires_grad_(False)
        _apply_card_defaults(model, source.card)
        return model

    @staticmethod
    def _later_stages(source: ModelSource, options: LoadOptions) -> list[Path]:
        """Stage II and III folders: load options first, else the zoo card's ``stages``."""
        explicit = [options.extra.get(f"stage{n}") for n in (2, 3)]
        if explicit[1] and not explicit[0]:
            raise ModelLoadError("stage3= needs stage2=: the upscaler works on stage II's output")
        if any(explicit):
            paths = [Path(p).expanduser() for p in explicit if p]
            missing = [str(p) for p in paths if not p.is_dir()]
            if missing:
                raise ModelLoadError(f"no such stage folder: {', '.join(missing)}")
            return paths
        if source.card and source.card.get("stages"):
            from aipaint.models import zoo

            return [zoo.download_from_hub(stage["repo"], patterns=stage.get("allow_patterns")) for stage in source.card["stages"]]
        return []


def _apply_card_defaults(model: IFCascade, card: dict[str, Any] | None) -> None:
    """A card's ``stage_defaults`` (one object per stage: steps, cfg_scale, noise_level)."""
    if not card:
        return
    for stage, values in zip(model.stages, card.get("stage_defaults", ()), strict=False):
        for key in ("steps", "cfg_scale", "noise_level"):
            if key in values:
                setattr(stage.defaults, key, values[key])


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    from aipaint_plugins.deepfloyd_if.options import IFOptions

    register(IFOptions)


@hookimpl
def register_models(register: Callable[[ModelFamily], None]) -> None:
    register(DeepFloydIF())
