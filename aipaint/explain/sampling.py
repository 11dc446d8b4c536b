"""Samplers side by side: one seed under several samplers and schedule types.

Every sampler walks the same model from pure noise to a picture, but through different noise
levels (the schedule type decides the sigmas: Karras spends more steps at low noise) and with
different update rules (first or second order, with or without fresh noise each step). The
sheet plots each run's sigmas and shows its predicted picture (x0) at the same fractions of
the run, ending with the finished image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

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

DEFAULT_SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "Heun", "DDIM")
DEFAULT_SCHEDULES = ("Automatic", "Karras")
MAX_RUNS = 16


def samplers(
    pipe: Pipeline,
    prompt: str | GenerationRequest,
    *,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    schedules: Sequence[str] = DEFAULT_SCHEDULES,
    columns: int = 5,
    cell: int = 96,
    progress: Any = None,
    **params: Any,
) -> ExplainResult:
    """Generate ``prompt`` (with ``params``) once per sampler and schedule type, with one seed.

    A sampler that lacks a schedule type is left out of that pairing (``data["skipped"]`` says
    which). ``columns``: how many pictures per run, at even fractions of the run, the last the
    finished image. ``data["runs"]`` holds per run its ``sampler``, ``schedule``, ``sigmas``
    (the sigma each step starts from, then the last), ``after`` (after each report of the loop),
    ``shown`` (1-based reports drawn), ``x0`` (their predicted clean latents) and ``image``;
    ``images[name]`` the pictures of a run.
    """
    from aipaint.explain import drawing

    model = latent_model(pipe)
    registry = pipe.host.registry.samplers
    if isinstance(samplers, str):
        samplers = [samplers]
    if isinstance(schedules, str):
        schedules = [schedules]
    specs = [registry.get(name) for name in samplers]  # an unknown name is an UnknownName with the known ones
    if isinstance(columns, bool) or not isinstance(columns, int) or not 2 <= columns <= MAX_COLUMNS:
        raise InvalidParameter("columns", columns, f"must be a whole number from 2 to {MAX_COLUMNS}")
    pairs, skipped = [], []
    unique = list({spec.name: spec for spec in specs}.values())
    for spec in unique:
        for schedule in dict.fromkeys(schedules):
            try:
                pairs.append((spec.name, spec.check_schedule(schedule)))
            except InvalidParameter:
                skipped.append(f"{spec.name} · {schedule}")
    if not pairs:
        raise InvalidParameter("schedules", list(schedules), "no sampler given offers these schedule types")
    if len(pairs) > MAX_RUNS:
        raise InvalidParameter("samplers", list(samplers), f"at most {MAX_RUNS} sampler and schedule pairs in one sheet")
    base = settled_request(pipe, prompt, params)
    runs: list[dict[str, Any]] = []
    rows: list[tuple[str, list[Any]]] = []
    captions: list[list[str]] = []
    for sampler, schedule in pairs:
        request = dataclasses.replace(base, sampler=sampler, schedule=schedule)
        levels = sigma_schedule(pipe, request)
        result, steps = run_watched(pipe, request, progress=progress)
        total = len(steps)
        shown = pick_steps(None, total, columns)
        after = levels.after if len(levels.after) == total else np.full(total, np.nan)
        pictures = [decode(model, steps[k - 1].x0) for k in shown[:-1]] + [result.images[0]]
        name = f"{sampler} · {schedule}"
        rows.append((name, pictures))
        captions.append([_caption(k, total, float(after[k - 1]), cell) for k in shown])
        runs.append({
            "sampler": sampler, "schedule": schedule, "name": name, "sigmas": np.asarray(levels.schedule),
            "after": np.asarray(after), "shown": np.array(shown),
            "x0": np.concatenate([steps[k - 1].x0.numpy() for k in shown]), "image": result.images[0],
            "parameters": parameters_text(result),
        })
    curves: list[tuple[np.ndarray, list[str]]] = []  # runs whose sigmas agree to 0.1% share a line
    for run in runs:
        same = next((names for sigmas, names in curves if sigmas.shape == run["sigmas"].shape
                     and np.allclose(sigmas, run["sigmas"], rtol=1e-3, atol=1e-6)), None)
        if same is None:
            curves.append((run["sigmas"], [run["name"]]))
        else:
            same.append(run["name"])
    series = [(_legend(names), list(range(len(sigmas))), sigmas.tolist()) for sigmas, names in curves]
    panel = drawing.line_plot(series, title="sigma each step starts from (log scale; each run ends at 0)",
                              xlabel="step", ylabel="sigma", log_y=True, size=(520, 240))
    notes = [f"seed {base.seed}, {base.steps} steps, CFG {base.cfg_scale}, {model.name}; columns: the predicted x0 "
             "after that share of each run, the last the finished image; under each: the report of the loop and the sigma left"]
    if skipped:
        notes.append("left out (the sampler lacks the schedule type): " + ", ".join(skipped))
    sheet = drawing.contact_sheet(
        rows, title=f"samplers: {base.prompt}", columns=[f"{round(100 * (i + 1) / columns)}%" for i in range(columns)],
        captions=captions, cell=cell, panels=[panel], notes=notes,
    )
    return ExplainResult(
        view="samplers",
        images={row[0]: row[1] for row in rows},
        columns=[f"{round(100 * (i + 1) / columns)}%" for i in range(columns)],
        data={"runs": runs, "skipped": skipped, "seed": base.seed, "request": base},
        sheet=sheet,
        plot=_plot,
        parameters=runs[0]["parameters"],
    )


def _caption(report: int, total: int, sigma: float, cell: int) -> str:
    from aipaint.explain.drawing import text_size

    full = f"{report}/{total} · {sigma_text(sigma)}"
    return full if text_size(full, 12)[0] <= cell else sigma_text(sigma)


def _legend(names: list[str]) -> str:
    schedule = names[0].split(" · ")[1]
    samplers_ = [n.split(" · ")[0] for n in names]
    text = ", ".join(samplers_[:3]) + (f" +{len(samplers_) - 3}" if len(samplers_) > 3 else "")
    return f"{schedule}: {text}"


def _plot(fig: Any, result: ExplainResult) -> None:
    runs = result.data["runs"]
    axes = fig.subplots(1, 2)
    for run in runs:
        sigmas = run["sigmas"]
        steps = np.arange(len(sigmas))
        positive = sigmas > 0
        axes[0].semilogy(steps[positive], sigmas[positive], marker="o", markersize=3, label=run["name"])
        after = run["after"]
        fraction = np.arange(1, len(after) + 1) / len(after)
        axes[1].semilogy(fraction[after > 0], after[after > 0], marker=".", label=run["name"])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("sigma")
    axes[0].set_title("the sigmas each run steps through")
    axes[1].set_xlabel("fraction of the run")
    axes[1].set_title("noise left after each report")
    axes[0].legend(fontsize=7)
