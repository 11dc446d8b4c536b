"""What the explain views share: the result they return, the model they need, the request
they run, each step the loop reports, and a sampler's noise levels (sigmas)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.pipeline import Pipeline

MAX_COLUMNS = 32
"""The most steps, timesteps or scales one view draws (a sheet stays readable)."""


@dataclass
class ExplainResult:
    """What a view returns: its pictures by row, the data behind them, and the contact sheet.

    ``images`` maps a row name to its pictures (one per column, ``columns`` names them);
    ``data`` holds numpy arrays and numbers (latents, sigmas, SNRs, attention maps), with the
    same column order; ``sheet`` is the labelled contact sheet; ``frames`` the animation
    frames where the view has one (``denoise``). :meth:`figure` draws the view's plots with
    matplotlib, where a plot reads better than a picture.
    """

    view: str
    images: dict[str, list[Image.Image]]
    columns: list[str]
    data: dict[str, Any]
    sheet: Image.Image
    frames: list[Image.Image] = field(default_factory=list)
    plot: Callable[[Any, ExplainResult], None] | None = field(default=None, repr=False)
    parameters: str = ""

    def save(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the contact sheet as PNG (with the generation's parameters, where there is one)."""
        from aipaint.explain.drawing import save_image

        return save_image(self.sheet, path, overwrite=overwrite, parameters=self.parameters or None)

    def save_animation(self, path: str | Path, *, overwrite: bool = True, duration: int = 250) -> Path:
        """Write the animation frames as a looping ``.gif`` or ``.webp`` (``duration`` ms a frame)."""
        from aipaint.explain.drawing import save_image

        if not self.frames:
            raise UnsupportedFeature(f"the {self.view} view has no animation (denoise has one)")
        return save_image(self.frames[0], path, overwrite=overwrite, frames=self.frames, duration=duration)

    def figure(self) -> Any:
        """A matplotlib ``Figure`` of the view's plots (needs matplotlib: ``pip install matplotlib``)."""
        Figure = matplotlib_figure()
        if self.plot is None:
            raise UnsupportedFeature(f"the {self.view} view has no plots")
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        self.plot(fig, self)
        return fig

    def save_figure(self, path: str | Path, *, overwrite: bool = True, dpi: int = 110) -> Path:
        """Write :meth:`figure` as PNG (or any format matplotlib knows from the suffix)."""
        import io

        from aipaint.api.result import check_writable

        fig = self.figure()  # matplotlib missing is said before anything is written
        path = Path(path)
        check_writable(path, overwrite=overwrite)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
        from aipaint.explain.drawing import write_new_file

        return write_new_file(buffer.getvalue(), path, overwrite=overwrite)


def matplotlib_figure() -> Any:
    """matplotlib's ``Figure`` class (no pyplot, no GUI backend), or a one-line error saying how to get it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedFeature(
            "plots need matplotlib, which is not installed: pip install matplotlib "
            "(the contact sheets and data need nothing more)"
        ) from None
    return Figure


def latent_model(pipe: Pipeline) -> LatentDiffusionModel:
    """The pipeline's model, which must be a latent diffusion model (the views read its VAE and
    noise schedule, and watch its loop)."""
    from aipaint.engine.samplers import is_flow_config
    from aipaint.models.latent import LatentDiffusionModel

    model = getattr(pipe, "model", None)
    if not isinstance(model, LatentDiffusionModel):
        raise UnsupportedFeature(
            f"explain needs a latent diffusion model (a UNet, a VAE and a text encoder in the core engine), {model!r} runs its own loop"
        )
    if is_flow_config(model.scheduler_config):
        raise UnsupportedFeature(
            f"explain's views read a variance-preserving noise schedule and a UNet's cross-attention; {model.family} "
            f"model {model.name!r} is a flow-matching transformer, which they do not support yet"
        )
    return model


def torch_unet(model: LatentDiffusionModel, view: str) -> torch.nn.Module:
    """The model's torch UNet, where the runtime calls it (ONNX Runtime and TensorRT run their own graph)."""
    if model.runtime != "torch":
        raise UnsupportedFeature(f"the {view} view watches the torch UNet; this model runs on {model.runtime!r}")
    return model.unet


def settled_request(pipe: Pipeline, prompt: str | GenerationRequest, params: dict[str, Any]) -> GenerationRequest:
    """The txt2img request of one image a view runs: ``prompt`` (text or a request) with
    ``params``, checked and settled on the loaded model (its defaults, a fixed seed), so that
    several runs of a view see the same noise."""
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.run import settle

    if isinstance(prompt, GenerationRequest):
        request = dataclasses.replace(prompt, **params) if params else prompt
    elif isinstance(prompt, str):
        request = GenerationRequest(prompt=prompt, **params)
    else:
        raise InvalidParameter("prompt", prompt, "must be a prompt text or a GenerationRequest")
    if request.batch_size != 1:
        raise InvalidParameter("batch_size", request.batch_size, "must be 1: an explain view follows one image")
    if request.init_image is not None or request.image_prompts:
        raise InvalidParameter("init_image", "<image>", "explain views follow text-to-image generations",
                               "leave out init_image, mask and image prompts")
    if request.refiner is not None:
        raise InvalidParameter("refiner", request.refiner, "explain views follow one model; leave out the refiner")
    request = pipe.check(request)
    return settle(latent_model(pipe), request, host=pipe.host)


@dataclass
class Step:
    """One step as the loop reported it, kept on the CPU."""

    step: int  # 1-based
    total: int
    latents: torch.Tensor  # 1 × C × h × w, the loop's latents after the step
    x0: torch.Tensor  # 1 × C × h × w, the model's estimate of the finished latents


def run_watched(pipe: Pipeline, request: GenerationRequest, on_step: Callable[[Any], None] | None = None, *,
                progress: Callable[[int, int], None] | None = None) -> tuple[Result, list[Step]]:
    """Run ``request`` and keep every step's latents and x0 estimate (``on_step`` sees each
    :class:`aipaint.engine.preview.StepPreview` first; ``progress(done, total)`` as for a generation)."""
    steps: list[Step] = []

    def preview(step: Any) -> None:
        if on_step is not None:
            on_step(step)
        steps.append(Step(step.step, step.total, step.latents.detach().float().cpu().clone(),
                          step.x0.detach().float().cpu().clone()))

    return pipe.generate(request, progress=progress, preview=preview), steps


def decode(model: LatentDiffusionModel, latents: torch.Tensor) -> Image.Image:
    """One latent (1 × C × h × w) through the model's VAE, as the generation decodes it."""
    from aipaint.engine.preview import to_pictures

    with torch.inference_mode():
        return to_pictures(model.decode(latents.to(model.device, model.dtype)))[0]


def pick_steps(at: Sequence[int] | None, total: int, count: int = 6) -> list[int]:
    """1-based steps to show: ``at`` checked, or ``count`` evenly spaced ending with the last."""
    if at is None:
        if total <= count:
            return list(range(1, total + 1))
        return sorted({round(total * (i + 1) / count) for i in range(count)})
    chosen = []
    for value in at:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= total:
            raise InvalidParameter("at", value, f"steps to show must be whole numbers from 1 to {total}")
        chosen.append(value)
    if not chosen or len(chosen) > MAX_COLUMNS:
        raise InvalidParameter("at", list(at), f"give 1 to {MAX_COLUMNS} steps")
    return sorted(set(chosen))


@dataclass(frozen=True)
class SigmaSchedule:
    """A sampler's noise levels over the model's schedule.

    ``schedule``: the sigma each step starts from, then the final one (``steps + 1`` values,
    what A1111 and k-diffusion call the sigmas). ``after``: the sigma of the loop's latents
    after each report of the loop, one per preview step (second-order schedulers such as
    Heun and DPM2 report twice a step: after their first, intermediate evaluation too).
    Sigmas are in the variance-exploding sense, ``sqrt((1 - alpha_bar) / alpha_bar)``, for
    every sampler (DDIM's variance-preserving latents are at the same noise level).
    """

    schedule: np.ndarray
    after: np.ndarray


def sigma_schedule(pipe: Pipeline, request: GenerationRequest) -> SigmaSchedule:
    """The :class:`SigmaSchedule` of the settled ``request``'s sampler, schedule type and steps."""
    from aipaint.engine.plans import FunctionPlan

    model = latent_model(pipe)
    spec = pipe.host.registry.samplers.get(request.sampler)
    plan = spec.plan(model.scheduler_config, request.schedule, request.steps, seeds=[request.seed])
    if isinstance(plan, FunctionPlan):
        sigmas = plan.sigmas.double().numpy()
        return SigmaSchedule(sigmas, sigmas[1:])
    scheduler = plan.scheduler
    alphas = scheduler.alphas_cumprod.double().clamp(min=2**-24).numpy()
    log_sigmas = np.log(np.sqrt((1 - alphas) / alphas))

    def sigma_at(t: Any) -> float:
        return float(np.exp(np.interp(float(t), np.arange(len(log_sigmas)), log_sigmas)))

    timesteps = [float(t) for t in scheduler.timesteps]
    own = getattr(scheduler, "sigmas", None)
    order = int(getattr(scheduler, "order", 1))
    final = float(own[-1]) if own is not None else 0.0
    if own is not None and order == 1 and len(own) == len(timesteps) + 1:
        sigmas = own.double().cpu().numpy()
        return SigmaSchedule(sigmas, sigmas[1:])
    after = np.array([sigma_at(t) for t in timesteps[1:]] + [final])
    if order > 1:
        starts = timesteps[::order]
    else:
        starts = [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]
    schedule = np.array([sigma_at(t) for t in starts[: request.steps]] + [final])
    return SigmaSchedule(schedule, after)


def sigma_text(sigma: float) -> str:
    if sigma == 0:
        return "σ 0"
    if sigma >= 100 or sigma < 0.01:
        return f"σ {sigma:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"σ {sigma:.3g}"


def parameters_text(result: Result) -> str:
    return result.infotexts[0] if result.infotexts else ""
