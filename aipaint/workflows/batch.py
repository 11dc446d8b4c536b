"""Prompts from a file (A1111's "Prompts from file or textbox" script), run as a resumable batch.

A prompts file holds one request a line, in one of two forms:

- text (``.txt`` and anything else): a line is a prompt, or, when it starts with ``--``, A1111's
  options: ``--prompt "a red circle" --negative_prompt "blue" --steps 20 --cfg_scale 7 --seed 1
  --sampler_name "Euler a" --width 32 --height 32 --batch_size 1 --n_iter 2`` (quoted as a shell
  quotes; ``--prompt`` and ``--negative_prompt`` also take the unquoted words up to the next
  option). aipaint also reads ``--schedule`` (``--scheduler``), ``--clip_skip``,
  ``--guidance_rescale``, ``--skip_early_cfg`` and ``--emphasis``;
- JSON lines (``.jsonl``, ``.ndjson``): an object a line with
  :class:`~aipaint.api.request.GenerationRequest` field names (and ``n_iter``).

Blank lines and lines starting with ``#`` are skipped. Fields a line leaves out come from the
batch's base request (the command's options). Each request (each of its ``n_iter`` runs) is
one job; its images are named by a hash of everything that decides them (request, model, post
chain, dynamic prompt mode), so a re-run skips the jobs whose files are all there: a killed
batch resumes where it stopped. ``manifest.jsonl`` in the output folder records each finished
job (its files, prompts, seeds, parameters and timing), one JSON object a line, each written
whole with one ``write`` and flushed to disk; a line cut short by a crash is skipped on reading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import AipaintError, InvalidParameter, shown

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline
    from aipaint.prompt.wildcards import DynamicPrompts

__all__ = ["BatchJob", "BatchProgress", "BatchReport", "Manifest", "PromptLine", "batch", "plan_batch",
           "read_prompts"]

MANIFEST_NAME = "manifest.jsonl"
MAX_PROMPTS_FILE_BYTES = 16 * 2**20
MAX_ITERATIONS = 1000
HASH_CHARS = 16
JSON_SUFFIXES = (".jsonl", ".ndjson")

# A1111's options (modules/scripts/prompts_from_file.py) and aipaint's additions: option → (field, type).
_LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str),
    "seed": ("seed", int), "subseed": ("subseed", int), "subseed_strength": ("subseed_strength", float),
    "seed_resize_from_h": ("seed_resize_from_h", int), "seed_resize_from_w": ("seed_resize_from_w", int),
    "sampler_name": ("sampler", str), "batch_size": ("batch_size", int), "n_iter": ("n_iter", int),
    "steps": ("steps", int), "cfg_scale": ("cfg_scale", float), "width": ("width", int), "height": ("height", int),
    "schedule": ("schedule", str), "scheduler": ("schedule", str), "clip_skip": ("clip_skip", int),
    "guidance_rescale": ("guidance_rescale", float), "skip_early_cfg": ("skip_early_cfg", float),
    "emphasis": ("emphasis", str),
}
# A1111's options about where and whether its web UI saves: nothing to do here.
_IGNORED = ("outpath_samples", "outpath_grids", "prompt_for_display", "do_not_save_samples", "do_not_save_grid")
# A1111's switches aipaint has no per-line equivalent of: accepted when off.
_OFF_ONLY = {"restore_faces": "add a --post face-restore step to the batch instead", "tiling": "aipaint has no tiling"}
_UNSUPPORTED = {
    "sd_model": "run one batch per model (-m)",
    "styles": "apply the styles to the lines' prompts before the batch",
    "sampler_index": "name the sampler with --sampler_name",
}
JSON_FIELDS = ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "width", "height",
               "batch_size", "clip_skip", "guidance_rescale", "skip_early_cfg", "emphasis", "subseed", "subseed_strength",
               "seed_resize_from_w", "seed_resize_from_h", "options", "n_iter")


@dataclass(frozen=True)
class PromptLine:
    """One line of a prompts file: its number (from 1), the request fields it sets, its ``n_iter``."""

    number: int
    fields: dict[str, Any]
    iterations: int = 1


def _convert(where: str, option: str, text: str, kind: type) -> Any:
    if kind is str:
        return text
    try:
        if len(text) > 40:
            raise ValueError
        return int(text) if kind is int else float(text)
    except ValueError:
        kinds = "a whole number" if kind is int else "a number"
        raise InvalidParameter(f"{where} --{option}", text, f"must be {kinds}") from None


def parse_a1111_line(text: str, where: str = "line") -> tuple[dict[str, Any], int]:
    """One text line: ``(request fields, n_iter)``. A line that does not start with ``--`` is a prompt."""
    stripped = text.strip()
    if not stripped.startswith("--"):
        return {"prompt": stripped}, 1
    try:
        words = shlex.split(stripped)
    except ValueError as exc:
        raise InvalidParameter(where, shown(stripped), f"cannot be read: {exc}", "quote values as a shell does") from None
    fields: dict[str, Any] = {}
    position = 0
    while position < len(words):
        word = words[position]
        if not word.startswith("--"):
            raise InvalidParameter(where, word, "must be an option starting with --, e.g. --steps 20")
        option = word[2:]
        if position + 1 >= len(words):
            raise InvalidParameter(where, word, "needs a value")
        value = words[position + 1]
        position += 2
        if option in ("prompt", "negative_prompt"):  # A1111 joins the words up to the next option
            while position < len(words) and not words[position].startswith("--"):
                value += " " + words[position]
                position += 1
        if option in _IGNORED:
            continue
        if option in _OFF_ONLY:
            if value.strip().lower() == "true":
                raise InvalidParameter(f"{where} --{option}", value, "is not supported here", _OFF_ONLY[option])
            continue
        if option in _UNSUPPORTED:
            raise InvalidParameter(where, f"--{option}", "is not supported by aipaint's batch", _UNSUPPORTED[option])
        if option not in _LINE_OPTIONS:
            from aipaint.api.options import close_matches

            raise InvalidParameter(where, f"--{option}", "is not an option of a prompts file; known: "
                                   + ", ".join(f"--{name}" for name in _LINE_OPTIONS) + close_matches(option, _LINE_OPTIONS))
        name, kind = _LINE_OPTIONS[option]
        fields[name] = _convert(where, option, value, kind)
    iterations = fields.pop("n_iter", 1)
    return fields, iterations


def parse_json_line(text: str, where: str = "line") -> tuple[dict[str, Any], int]:
    """One JSON line: an object of request fields (and ``n_iter``)."""
    try:
        fields = json.loads(text)
    except ValueError as exc:
        raise InvalidParameter(where, shown(text.strip()), f"is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise InvalidParameter(where, shown(text.strip()), "must be a JSON object of request fields")
    unknown = [key for key in fields if key not in JSON_FIELDS]
    if unknown:
        from aipaint.api.options import close_matches

        raise InvalidParameter(f"{where} field", unknown[0], "is not a request field a prompts file sets; known: "
                               + ", ".join(JSON_FIELDS) + close_matches(str(unknown[0]), JSON_FIELDS))
    iterations = fields.pop("n_iter", 1)
    return fields, iterations


def read_prompts(source: str | Path | Sequence[Any]) -> list[PromptLine]:
    """The lines of a prompts file (see the module doc), or of a list whose items are text lines,
    mappings of request fields, :class:`~aipaint.api.request.GenerationRequest` objects or
    :class:`PromptLine` objects (kept as they are)."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        try:
            size = path.stat().st_size
            if size > MAX_PROMPTS_FILE_BYTES:
                raise InvalidParameter("prompts file", str(path), f"is {size:,} bytes, more than {MAX_PROMPTS_FILE_BYTES:,}")
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidParameter("prompts file", str(path), f"is not UTF-8 text ({exc.reason})") from None
        except OSError as exc:
            raise InvalidParameter("prompts file", str(path), f"cannot be read ({exc.strerror or exc})") from None
        parse = parse_json_line if path.suffix.lower() in JSON_SUFFIXES else parse_a1111_line
        items: list[Any] = text.splitlines()
        name = path.name
    else:
        items, parse, name = list(source), parse_a1111_line, "item"
    lines = []
    for number, item in enumerate(items, 1):
        where = f"{name} line {number}" if name != "item" else f"item {number}"
        if isinstance(item, PromptLine):
            lines.append(item)
            continue
        if isinstance(item, str):
            if not item.strip() or item.lstrip().startswith("#"):
                continue
            fields, iterations = parse(item, where)
        elif isinstance(item, dict):
            fields, iterations = parse_json_line(json.dumps(item, default=str), where)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            fields, iterations = {"request": item}, 1
        else:
            raise InvalidParameter(where, item, "must be a text line, a mapping of request fields or a GenerationRequest")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
            raise InvalidParameter(f"{where} n_iter", iterations, f"must be a whole number from 1 to {MAX_ITERATIONS}")
        lines.append(PromptLine(number, fields, iterations))
    return lines


# --- the plan -----------------------------------------------------------------------------------
@dataclass
class BatchJob:
    """One run of one line: its id (the hash its files are named by), the request (prompts not yet
    resolved unless ``resolved``), the templates (combinatorial jobs) and its files."""

    id: str
    line: int
    iteration: int
    request: GenerationRequest
    files: list[Path]
    resolved: bool = False
    template: str | None = None
    negative_template: str | None = None


def stable(value: Any) -> Any:
    """``value`` as JSON data that is the same in every run (images by a digest of their pixels)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): stable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable(v) for v in value]
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return {"image": hashlib.sha256(value.tobytes()).hexdigest(), "mode": value.mode, "size": list(value.size)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields at their defaults are left out: a field a later aipaint adds does not rename every image.
        return {"type": type(value).__name__, **{f.name: stable(getattr(value, f.name)) for f in dataclasses.fields(value)
                                                 if not _is_default(f, getattr(value, f.name))}}
    model = getattr(value, "model", value)  # a refiner: its model's name and hash
    return {"type": type(value).__name__, "name": str(getattr(model, "name", "")), "hash": str(getattr(model, "model_hash", ""))}


def at_line(exc: AipaintError, number: int) -> AipaintError:
    """``exc``, its message saying the line of the prompts file it is about (its type kept)."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (f"line {number}: {exc.args[0]}", *exc.args[1:])
    return exc


def _option_values(group: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(group) and not isinstance(group, type):
        return {f.name: getattr(group, f.name) for f in dataclasses.fields(group)}
    return dict(group or {})


def _is_default(spec: dataclasses.Field, value: Any) -> bool:
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        default = spec.default_factory()
    else:
        return False
    try:
        return type(value) is type(default) and bool(value == default)
    except Exception:  # a value whose == is not a plain truth value (an array)
        return False


def _line_request(base: GenerationRequest, fields: dict[str, Any]) -> GenerationRequest:
    """``base`` with a line's fields; its ``options`` are merged into the base's, option by option."""
    if "request" in fields:
        return fields["request"]
    fields = dict(fields)
    if "options" in fields:
        given = fields.pop("options") or {}
        if not isinstance(given, dict):
            raise InvalidParameter("options", given, "must be an object of namespaces to options")
        options = {namespace: _option_values(group) for namespace, group in base.options.items()}
        for namespace, values in given.items():
            if not isinstance(values, dict):
                raise InvalidParameter(f"options[{namespace!r}]", values, "must be an object of option names to values")
            options.setdefault(namespace, {}).update(values)
        fields["options"] = options
    return dataclasses.replace(base, **fields)


def plan_batch(lines: Sequence[PromptLine], base: GenerationRequest, out_dir: str | Path, *,
               dynamic: DynamicPrompts | None = None, combinatorial: bool = False, max_prompts: int | None = None,
               salt: dict[str, Any] | None = None) -> list[BatchJob]:
    """The jobs of a batch, each request checked (its fields; its dynamic prompt's syntax and
    wildcards). ``salt`` joins what else decides the images (the model, the post chain) in the hash."""
    from aipaint.api.request import MAX_SEED
    from aipaint.api.result import batch_paths
    from aipaint.prompt.wildcards import DEFAULT_MAX_PROMPTS
    from aipaint.workflows.common import resolve_request

    out_dir = Path(out_dir)
    jobs: list[BatchJob] = []
    seen: dict[str, int] = {}
    for line in lines:
        try:
            request = _line_request(base, line.fields)
            if dynamic is not None:
                dynamic.check(request.prompt)
                dynamic.check(request.negative_prompt, what="negative prompt")
        except AipaintError as exc:
            raise at_line(exc, line.number) from None
        for iteration in range(line.iterations):
            run = request
            if request.seed != -1 and iteration:  # A1111: each run goes on from the seeds of the last
                run = dataclasses.replace(request, seed=(request.seed + iteration * request.batch_size) % (MAX_SEED + 1))
            key = {"request": stable(run), "iteration": iteration, **stable(salt or {}),
                   "dynamic": None if dynamic is None else ("combinatorial" if combinatorial else "random"),
                   "wildcards": None if dynamic is None or dynamic.folder is None else str(dynamic.folder.root)}
            if dynamic is not None and combinatorial:
                prompt_jobs = resolve_request(run, dynamic, combinatorial=True, max_prompts=max_prompts or DEFAULT_MAX_PROMPTS)
                variants = [({**key, "prompt": j.request.prompt, "negative": j.request.negative_prompt}, j) for j in prompt_jobs]
            else:
                variants = [(key, None)]
            for variant_key, prompt_job in variants:
                digest = hashlib.sha256(json.dumps(variant_key, sort_keys=True, default=str).encode()).hexdigest()
                copy = seen.get(digest, 0)  # the same request twice is two jobs (two random seeds)
                seen[digest] = copy + 1
                if copy:
                    digest = hashlib.sha256(f"{digest}:{copy}".encode()).hexdigest()
                job_id = digest[:HASH_CHARS]
                job_request = prompt_job.request if prompt_job is not None else run
                jobs.append(BatchJob(job_id, line.number, iteration, job_request,
                                     batch_paths(out_dir / f"{job_id}.png", job_request.batch_size),
                                     prompt_job is not None, prompt_job.template if prompt_job else None,
                                     prompt_job.negative_template if prompt_job else None))
    return jobs


# --- the manifest -------------------------------------------------------------------------------
class Manifest:
    """``manifest.jsonl``: one JSON object a finished job, appended whole and flushed to disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.skipped_lines = 0

    def read(self) -> dict[str, dict[str, Any]]:
        """The records by job id (a later record of an id wins); lines that are not whole JSON
        objects (cut short by a crash) are skipped and counted in ``skipped_lines``. A last line
        without its newline gets one, so that the next record starts on a line of its own."""
        records: dict[str, dict[str, Any]] = {}
        self.skipped_lines = 0
        if not self.path.exists():
            return records
        data = self.path.read_bytes()
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                self.skipped_lines += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = record
            else:
                self.skipped_lines += 1
        if data and not data.endswith(b"\n"):
            self._write(b"\n")
        return records

    def append(self, record: dict[str, Any]) -> None:
        self._write((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, 0o666)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)


# --- running ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProgress:
    """What :func:`batch` reports after each job: its place, the job, ``"generated"`` or
    ``"skipped"`` (done before), and the seconds it took."""

    index: int
    total: int
    job: BatchJob
    status: str
    seconds: float = 0.0


@dataclass
class BatchReport:
    """What a batch did: the files it wrote, those it found done, the manifest, the time taken."""

    generated: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    jobs: list[BatchJob] = field(default_factory=list)
    manifest: Path | None = None
    seconds: float = 0.0


def recovered(job: BatchJob) -> dict[str, Any]:
    """The record of a job whose files were written but whose record was not (a kill in between)."""
    from aipaint.infotext import Infotext, read_png_parameters

    parameters = [read_png_parameters(path) or "" for path in job.files]
    info = Infotext.from_text(parameters[0]) if parameters[0] else Infotext("")
    seeds = [Infotext.from_text(text).params.get("Seed") if text else None for text in parameters]
    return {"id": job.id, "line": job.line, "iteration": job.iteration, "files": [p.name for p in job.files],
            "prompt": info.prompt, "negative_prompt": info.negative_prompt, "seeds": seeds, "parameters": parameters,
            "seconds": None, "recovered": True, "finished": now()}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())



def batch_salt(pipe: Any, post: Sequence[Any] = ()) -> dict[str, Any]:
    """What else decides a batch's images (the model and the post chain), joined into each job's
    hash: the local batch and the Ray batch name their files alike."""
    model = getattr(pipe, "model", None)
    return {"model": f"{getattr(model, 'name', '')} [{getattr(model, 'model_hash', '') or ''}]",
            "post": stable(list(post))}


def job_record(job: BatchJob, prompt_job: Any, result: Any, seconds: float) -> dict[str, Any]:
    """A finished job's manifest record (the local batch's and the Ray batch's)."""
    return {
        "id": job.id, "line": job.line, "iteration": job.iteration, "files": [p.name for p in job.files],
        "prompt": prompt_job.request.prompt, "negative_prompt": prompt_job.request.negative_prompt,
        **({"template": prompt_job.template} if prompt_job.template is not None else {}),
        **({"negative_template": prompt_job.negative_template} if prompt_job.negative_template is not None else {}),
        "seeds": result.seeds, "parameters": result.infotexts, "seconds": round(seconds, 4),
        "timings": {k: round(v, 4) for k, v in result.timings.items()}, "finished": now(),
    }

def batch(pipe: Pipeline, source: str | Path | Sequence[Any], out_dir: str | Path, *,
          base: GenerationRequest | None = None, dynamic: DynamicPrompts | None = None, combinatorial: bool = False,
          max_prompts: int | None = None, post: Sequence[Any] = (),
          on_progress: Callable[[BatchProgress], None] | None = None) -> BatchReport:
    """Run every request of a prompts file (or list, see :func:`read_prompts`) into ``out_dir``,
    skipping jobs whose files exist from an earlier run, recording each finished job in
    ``out_dir/manifest.jsonl``. ``base`` gives the fields lines leave out; ``dynamic`` resolves
    each job's wildcards and variants (``combinatorial``: every combination, at most
    ``max_prompts`` a line); ``post`` is a post-processing chain run on every image. Every line
    is read and checked before the first generation."""
    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import save_png
    from aipaint.workflows.common import PromptJob, resolve_request, run_job

    started = time.perf_counter()
    lines = read_prompts(source)
    base = base if base is not None else GenerationRequest(prompt="")
    salt = batch_salt(pipe, post)
    jobs = plan_batch(lines, base, out_dir, dynamic=dynamic, combinatorial=combinatorial, max_prompts=max_prompts,
                      salt=salt)
    for job in jobs:
        try:
            pipe.check(job.request)
        except AipaintError as exc:
            raise at_line(exc, job.line) from None
    manifest = Manifest(Path(out_dir) / MANIFEST_NAME)
    records = manifest.read()
    report = BatchReport(jobs=jobs, manifest=manifest.path)
    for index, job in enumerate(jobs, 1):
        if all(path.is_file() for path in job.files):
            if job.id not in records:
                manifest.append(recovered(job))
            report.skipped.extend(job.files)
            if on_progress is not None:
                on_progress(BatchProgress(index, len(jobs), job, "skipped"))
            continue
        job_started = time.perf_counter()
        if job.resolved:
            prompt_job = PromptJob(job.request, job.template, job.negative_template)
        else:
            prompt_job = resolve_request(job.request, dynamic)[0]
        result = run_job(pipe, prompt_job, post=post)
        for image, infotext, path in zip(result.images, result.infotexts, job.files):
            save_png(image, path, infotext, overwrite=True)  # a file of a batch cut short is written again
        seconds = time.perf_counter() - job_started
        manifest.append(job_record(job, prompt_job, result, seconds))
        report.generated.extend(job.files)
        if on_progress is not None:
            on_progress(BatchProgress(index, len(jobs), job, "generated", seconds))
    report.seconds = time.perf_counter() - started
    return report
