"""What a finished generation records: the seeds, A1111's parameters for each image, timings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aipaint import __version__
from aipaint.api.result import Result
from aipaint.engine.noise import seed_infotext
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, build_params

if TYPE_CHECKING:
    import torch

    from aipaint.api.request import GenerationRequest
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.plugin.host import PluginHost


def refiner_model(refiner: Any) -> LatentDiffusionModel:
    """The model behind a request's ``refiner`` (a loaded Pipeline or model)."""
    from aipaint.models.latent import LatentDiffusionModel

    model = getattr(refiner, "model", refiner)
    if not isinstance(model, LatentDiffusionModel):
        raise InvalidParameter("refiner", refiner, "must be a loaded latent diffusion model: refiner=aipaint.load(<refiner model>)")
    return model


def infotext_params(
    model: LatentDiffusionModel, host: PluginHost, request: GenerationRequest, seed: int, extra: dict[str, str]
) -> dict[str, str]:
    """A1111's parameter entries for the image of ``request`` made with ``seed``."""
    values: dict[str, Any] = {
        "Steps": request.steps,
        "Sampler": host.registry.samplers.get(request.sampler).name,
        "Schedule type": request.schedule,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model.model_hash,
        "Model": model.name,
        **seed_infotext(request, seed),
    }
    if request.clip_skip > 1:
        values["Clip skip"] = request.clip_skip
    if request.guidance_rescale:
        values["Guidance rescale"] = request.guidance_rescale
    if request.skip_early_cfg and request.cfg_scale > 1:
        values["Skip Early CFG"] = request.skip_early_cfg
    if request.emphasis == "none":
        values["Emphasis"] = "No norm"
    elif model.defaults.emphasis != "a1111":  # A1111's default, said when this model's differs
        values["Emphasis"] = "Original"
    if request.refiner is not None:
        refiner = refiner_model(request.refiner)
        values["Refiner"] = f"{refiner.name} [{refiner.model_hash}]" if refiner.model_hash else refiner.name
        values["Refiner switch at"] = request.refiner_switch_at
    values.update(getattr(model, "runtime_infotext", None) or {})  # what the runtime set, e.g. Precision: bf16
    values.update(extra)
    values["Version"] = f"aipaint {__version__}"
    return build_params(values)


def make_result(
    model: LatentDiffusionModel,
    host: PluginHost,
    request: GenerationRequest,
    images: list[Any],
    extra: dict[str, str],
    timings: dict[str, float],
    *,
    latents: torch.Tensor | None = None,
) -> Result:
    infotexts = [
        Infotext(request.prompt, request.negative_prompt, infotext_params(model, host, request, seed, extra)).to_text()
        for seed in request.seeds
    ]
    return Result(images=images, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings,
                  latents=latents, added_parameters=build_params(extra))
