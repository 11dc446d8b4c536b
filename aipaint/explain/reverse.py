"""A generation as a strip: the latents after chosen steps, and the model's guess of the finished picture.

After every step the loop reports its latents ``x_t`` and the model's current estimate of the
clean latents ``x0`` (:class:`aipaint.engine.preview.StepPreview`). Both are decoded by the
model's VAE: the top row shows how the noise clears, the bottom row what the model already
"sees" in it. Under each column: the sigma (noise level) of the latents after that step.
The last column's latents are the finished ones, so its top picture is the generated image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aipaint.errors import InvalidParameter
from aipaint.explain.common import (
    MAX_COLUMNS,
    ExplainResult,
    decode,
    latent_model,
    parameters_text,
    pick_steps,
    run_watched,
    settled_request,
    sigma_schedule,
    sigma_text,
)

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline


def denoise(
    pipe: Pipeline,
    prompt: str | GenerationRequest,
    *,
    at: Sequence[int] | None = None,
    columns: int = 6,
    cell: int = 128,
    animation: bool = True,
    progress: Any = None,
    **params: Any,
) -> ExplainResult:
    """Generate ``prompt`` (with ``params``, as :class:`aipaint.GenerationRequest` takes them) and
    draw the steps ``at`` (1-based; default: ``columns`` evenly spaced, ending with the last).

    ``images["latents"]`` and ``images["x0"]`` hold the decoded pictures of the shown steps,
    ``images["result"]`` the generated image; ``data`` holds ``latents`` and ``x0`` of every step
    (S × C × h × w), ``sigmas`` (the noise level after each step), ``schedule`` (the sampler's
    sigmas), ``shown`` (the steps drawn), ``seed`` and ``request``. ``frames`` is the whole run
    as an animation (both rows, one frame a step; none with ``animation=False``, which saves
    decoding every step).
    """
    from aipaint.explain import drawing

    model = latent_model(pipe)
    request = settled_request(pipe, prompt, params)
    schedule = sigma_schedule(pipe, request)
    result, steps = run_watched(pipe, request, progress=progress)
    total = len(steps)
    if isinstance(columns, bool) or not isinstance(columns, int) or not 1 <= columns <= MAX_COLUMNS:
        raise InvalidParameter("columns", columns, f"must be a whole number from 1 to {MAX_COLUMNS}")
    shown = pick_steps(at, total, columns)
    after = schedule.after if len(schedule.after) == total else np.full(total, np.nan)
    latents_row = [decode(model, steps[k - 1].latents) for k in shown]
    x0_row = [decode(model, steps[k - 1].x0) for k in shown]
    labels = [f"step {k}/{total}" for k in shown]
    captions = [sigma_text(float(after[k - 1])) for k in shown]
    panel = drawing.line_plot(
        [("", list(range(1, total + 1)), after.tolist())],
        title="noise level of the latents after each step (log scale; the last is 0)", xlabel="step",
        ylabel="sigma", log_y=True, points=[(k, float(after[k - 1])) for k in shown],
        size=(max(420, min(760, len(shown) * (cell + 8))), 200),
    )
    sheet = drawing.contact_sheet(
        [("latents x_t", latents_row), ("predicted x0", x0_row)],
        title=f"denoising: {request.prompt}",
        columns=labels, captions=[captions, []], cell=cell, panels=[panel],
        notes=[f"{request.sampler} ({request.schedule}), {request.steps} steps, CFG {request.cfg_scale}, "
               f"seed {request.seed}, {model.name}",
               "top: the loop's latents decoded by the VAE; bottom: the model's estimate of the finished picture"],
    )
    frames = _frames(model, steps, after, cell) if animation else []
    return ExplainResult(
        view="denoise",
        images={"latents": latents_row, "x0": x0_row, "result": list(result.images)},
        columns=labels,
        data={
            "latents": torch.cat([s.latents for s in steps]).numpy(),
            "x0": torch.cat([s.x0 for s in steps]).numpy(),
            "sigmas": np.asarray(after),
            "schedule": np.asarray(schedule.schedule),
            "shown": np.array(shown),
            "seed": request.seed,
            "request": request,
        },
        sheet=sheet,
        frames=frames,
        plot=_plot,
        parameters=parameters_text(result),
    )


def _frames(model: Any, steps: list[Any], after: np.ndarray, cell: int) -> list[Any]:
    from aipaint.explain import drawing

    frames = []
    for index, step in enumerate(steps):
        pair = drawing.side_by_side([drawing.enlarge(decode(model, step.latents), cell),
                                     drawing.enlarge(decode(model, step.x0), cell)])
        frames.append(drawing.labelled(pair, f"step {step.step}/{step.total} · {sigma_text(float(after[index]))}"
                                             "   left: x_t, right: predicted x0"))
    return frames


def _plot(fig: Any, result: ExplainResult) -> None:
    data = result.data
    axes = fig.subplots(1, 2)
    sigmas = data["sigmas"]
    steps = np.arange(1, len(sigmas) + 1)
    positive = sigmas > 0
    axes[0].semilogy(steps[positive], sigmas[positive], marker="o")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("sigma after the step")
    axes[0].set_title("noise level")
    latents, x0 = data["latents"], data["x0"]
    change = np.sqrt(((x0[1:] - x0[:-1]) ** 2).mean(axis=(1, 2, 3)))
    distance = np.sqrt(((latents - latents[-1:]) ** 2).mean(axis=(1, 2, 3)))
    axes[1].plot(steps, distance, marker="o", label="latents to the final latents")
    axes[1].plot(steps[1:], change, marker="o", label="change of predicted x0")
    axes[1].set_xlabel("step")
    axes[1].set_title("how the picture settles (RMS, latent units)")
    axes[1].legend()
