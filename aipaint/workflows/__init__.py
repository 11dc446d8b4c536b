"""Workflows over many generations: A1111's X/Y/Z plot (:func:`xyz`), prompts from a file as a
resumable batch (:func:`batch`), and dynamic prompts (wildcards and ``{a|b}`` variants,
:class:`aipaint.prompt.wildcards.DynamicPrompts`) resolved into requests (:func:`resolve_request`).

>>> import aipaint
>>> from aipaint.workflows import xyz, batch
>>> pipe = aipaint.load()
>>> plot = xyz(pipe, "a big red circle", x="cfg: 1, 3, 7", y="seed: 1-3", output="grid.png")
>>> report = batch(pipe, "prompts.txt", "out/")

Importing this package imports neither torch nor Pillow; running a workflow does.
"""

from aipaint.workflows.batch import (
    BatchJob,
    BatchProgress,
    BatchReport,
    Manifest,
    PromptLine,
    batch,
    plan_batch,
    read_prompts,
)
from aipaint.workflows.common import (
    NEGATIVE_TEMPLATE_KEY,
    TEMPLATE_KEY,
    PromptJob,
    record_entries,
    resolve_request,
    run_job,
)
from aipaint.workflows.xyz import AXIS_TYPES, Axis, AxisType, XYZCell, XYZResult, make_axis, parse_axis, xyz

__all__ = [
    "AXIS_TYPES", "Axis", "AxisType", "BatchJob", "BatchProgress", "BatchReport", "Manifest", "NEGATIVE_TEMPLATE_KEY",
    "PromptJob", "PromptLine", "TEMPLATE_KEY", "XYZCell", "XYZResult", "batch", "make_axis", "parse_axis", "plan_batch",
    "read_prompts", "record_entries", "resolve_request", "run_job", "xyz",
]
