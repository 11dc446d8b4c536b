"""The prompts-file batch on a Ray cluster: :func:`aipaint.workflows.batch.batch`, scaled out.

The request file, the job list, the names (each job's hash) and ``manifest.jsonl`` are the local
batch's own (:func:`~aipaint.workflows.batch.read_prompts`, :func:`~aipaint.workflows.batch.plan_batch`,
:class:`~aipaint.workflows.batch.Manifest`): a folder the local batch started is finished by this one
and the other way round. What changes is who generates:

- the driver (this process) reads and checks every line, names the jobs, skips those whose files
  exist (a re-run resumes), fixes each remaining job's seed and resolves its dynamic prompt, then
  hands the jobs to **Ray Data**: one row a job, mapped by an **actor pool** whose actors each load
  the model once (one pipeline per worker; a GPU each when the model is loaded on ``cuda``);
- the workers write each job's PNGs into the output folder when they can see it (shared storage:
  the driver leaves a marker file there and each worker looks for it), else they send the images
  back and the driver writes them ("streamed back"). PNGs are written atomically (a temp name, then
  a rename), so a file that is there is whole;
- the driver alone appends to the manifest, once per job id, as results arrive.

Faults: Ray restarts a worker actor that dies and retries the tasks it had in flight (Ray Data's
actor pools run with ``max_restarts=-1`` and ``max_task_retries=-1``), so a dead worker costs only
its in-flight jobs. A retried job whose files the dead attempt already wrote is not generated again
(its record is rebuilt from the PNGs, as the local batch does), a job's seed is fixed before it is
sent so a regenerated image is the same image, and a result that arrives twice is recorded once.
A job that fails (its error) does not stop the others; the run raises at the end, naming the
lines, and a re-run retries them.

Importing this module imports neither Ray nor torch; :func:`ray_batch` does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import AipaintError, InvalidParameter
from aipaint.workflows.batch import (
    MANIFEST_NAME,
    BatchJob,
    BatchProgress,
    BatchReport,
    Manifest,
    at_line,
    batch_salt,
    job_record,
    plan_batch,
    read_prompts,
    recovered,
)

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline
    from aipaint.prompt.wildcards import DynamicPrompts

__all__ = ["IMAGE_MODES", "RayBatchReport", "RayProgress", "WorkerSpec", "ray_batch"]

IMAGE_MODES = ("auto", "shared", "stream")
MARKER_PREFIX = ".aipaint-ray-"
TASKS_IN_FLIGHT_PER_WORKER = 2  # one running, one waiting: a worker never idles between jobs
log = logging.getLogger("aipaint.ray")


# --- errors across processes ----------------------------------------------------------------------
def _portable(exc: BaseException) -> tuple[Any, ...]:
    """``exc`` as data that crosses a process: its class (by reference), args and attributes. Not
    pickled whole: aipaint's errors take other constructor arguments than their ``args``."""
    if isinstance(exc, AipaintError):
        return (type(exc), exc.args, {k: v for k, v in vars(exc).items() if _plain(v)})
    return (AipaintError, (f"{type(exc).__name__}: {' '.join(str(exc).split())}",), {})


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple, list))


def _rebuilt(data: tuple[Any, ...]) -> AipaintError:
    kind, args, state = data
    exc = kind.__new__(kind)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


# --- the worker -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What every worker is started with: the model to load (as for :func:`aipaint.load`), the
    post chain, the output folder (absolute), the marker that tells it the folder is shared, the
    image mode and the salt the jobs were named with (a worker whose model differs refuses them)."""

    model: Any = None
    load_options: dict[str, Any] = field(default_factory=dict)
    post: tuple[Any, ...] = ()
    out_dir: str = ""
    marker: str = ""
    images: str = "auto"
    salt: dict[str, Any] | None = None


class Worker:
    """One loaded pipeline. As a Ray actor it is the probe that names and checks a batch for a
    driver without the model; subclassed by the actor pool's callable, it runs jobs."""

    def __init__(self, spec: WorkerSpec) -> None:
        import aipaint

        self.spec = spec
        self.pipe: Any = None
        self.salt: dict[str, Any] = {}
        self.failure: tuple[Any, ...] | None = None
        try:  # a model that does not load is the user's one-line error, not a dead actor Ray retries
            self.pipe = aipaint.load(spec.model, **spec.load_options)
            self.salt = batch_salt(self.pipe, spec.post)
        except AipaintError as exc:
            self.failure = _portable(exc)

    def describe(self) -> dict[str, Any] | tuple[Any, ...]:
        """The salt the loaded model names jobs with, or (a tuple) the portable error that stopped it loading."""
        return self.failure if self.failure is not None else self.salt

    def check(self, items: Sequence[tuple[int, GenerationRequest]]) -> tuple[Any, ...] | None:
        """The first request the loaded pipeline refuses, as a portable error naming its line; None when all pass."""
        if self.failure is not None:
            return self.failure
        for line, request in items:
            try:
                self.pipe.check(request)
            except AipaintError as exc:
                return _portable(at_line(exc, line))
        return None


class Painter(Worker):
    """The actor pool's callable: a batch of rows (one job each) in, their outcomes out."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        import warnings

        import ray

        restarted = False
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            with warnings.catch_warnings():  # Ray's own property uses a deprecated one inside
                warnings.simplefilter("ignore")
                restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.identity = {"node": ray.util.get_node_ip_address(), "pid": os.getpid(), "restarted": restarted}
        self.out_dir = Path(spec.out_dir)
        self.shared = spec.images != "stream" and bool(spec.marker) and (self.out_dir / spec.marker).is_file()
        self.refusal: AipaintError | None = None
        if self.failure is not None:
            self.refusal = _rebuilt(self.failure)
        elif spec.images == "shared" and not self.shared:
            self.refusal = AipaintError(f"the output folder {self.out_dir} is not visible on the worker at "
                                        f"{self.identity['node']}: put it on storage every node mounts at the same "
                                        "path, or let the images come back to the driver (images='stream')")
        elif spec.salt is not None and self.salt["model"] != spec.salt["model"]:
            self.refusal = AipaintError(f"the worker at {self.identity['node']} loaded {self.salt['model']}, but the "
                                        f"batch was named for {spec.salt['model']}: every node must have the same model")

    def __call__(self, rows: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from ray import cloudpickle

        outcomes = [cloudpickle.dumps(self.run(cloudpickle.loads(payload))) for payload in rows["payload"]]
        return {"index": np.asarray(rows["index"]), "outcome": np.array(outcomes, dtype=object)}

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """One job: its images written (shared storage) or returned, its record; or its error."""
        from aipaint.api.result import save_png
        from aipaint.workflows.common import run_job

        job: BatchJob = task["job"]
        job = dataclasses.replace(job, files=[self.out_dir / path.name for path in job.files])
        outcome: dict[str, Any] = {"id": job.id, "worker": self.identity, "images": None}
        if self.refusal is not None:
            return {**outcome, "error": _portable(self.refusal)}
        try:
            if self.shared and all(path.is_file() for path in job.files):
                # A retry of a job whose earlier attempt wrote its files and died before it answered.
                return {**outcome, "status": "recovered", "record": {**recovered(job), "worker": self.identity}}
            started = time.perf_counter()
            result = run_job(self.pipe, task["prompt_job"], post=self.spec.post)
            if self.shared:
                for image, infotext, path in zip(result.images, result.infotexts, job.files):
                    save_png(image, path, infotext, overwrite=True)
            else:
                outcome["images"] = list(zip(result.images, result.infotexts))
            record = job_record(job, task["prompt_job"], result, time.perf_counter() - started)
            return {**outcome, "status": "generated", "record": {**record, "worker": self.identity}}
        except Exception as exc:  # one job's failure is reported, and the others go on
            log.exception("job %s (line %s) failed", job.id, job.line)
            return {**outcome, "error": _portable(at_line(exc, job.line) if isinstance(exc, AipaintError) else exc)}


# --- the driver -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayProgress(BatchProgress):
    """:class:`BatchProgress` for a Ray batch: ``index`` counts jobs as they finish, in any order;
    ``worker`` is the node, pid and ``restarted`` flag of the worker that ran the job (empty for a
    job done before); ``status`` may also be ``"recovered"`` (a retried job whose files were there)."""

    worker: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayBatchReport(BatchReport):
    """:class:`BatchReport`, and the number of workers the pool ran and of jobs their restarted replacements ran."""

    workers: int = 0
    by_restarted_workers: int = 0


def _connect(address: str | None, init_options: dict[str, Any] | None) -> bool:
    """Connect to Ray (``address``, else ``$RAY_ADDRESS``, else a new Ray on this machine); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, **(init_options or {})}
    ray.init(address=address, **options)
    return True


def _check_options(images: str, workers: int | None, num_cpus: float, num_gpus: float | None) -> None:
    if images not in IMAGE_MODES:
        raise InvalidParameter("images", images, "must be one of " + ", ".join(IMAGE_MODES))
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidParameter("workers", workers, "must be a whole number, 1 or more")
    if not isinstance(num_cpus, (int, float)) or isinstance(num_cpus, bool) or num_cpus < 0:
        raise InvalidParameter("num_cpus", num_cpus, "must be a number of CPUs, 0 or more (0.5: half a core)")
    if num_gpus is not None and (not isinstance(num_gpus, (int, float)) or isinstance(num_gpus, bool) or num_gpus < 0):
        raise InvalidParameter("num_gpus", num_gpus, "must be a number of GPUs, 0 or more")


def _cluster() -> tuple[float, float]:
    """The Ray cluster's CPUs and GPUs, checked to hold one worker's share."""
    import ray

    total = ray.cluster_resources()
    return total.get("CPU", 0.0), total.get("GPU", 0.0)


def _check_fits(num_cpus: float, num_gpus: float) -> None:
    """Refuse now a worker the cluster cannot place (Ray would wait for it for ever)."""
    cpus, gpus = _cluster()
    if num_gpus and gpus < num_gpus:
        raise AipaintError(f"the workers load the model on a GPU (device cuda), but the Ray cluster has {gpus:g} GPUs; "
                           "load on the CPU (--device cpu) or add GPU nodes")
    if cpus < num_cpus:
        raise AipaintError(f"a worker needs {num_cpus:g} CPUs, but the Ray cluster has {cpus:g}; add nodes")


def _pool_size(workers: int | None, jobs: int, num_cpus: float, num_gpus: float) -> int:
    """How many workers to start: ``workers``, or as many as the cluster's CPUs (GPUs) hold; at most one a job."""
    cpus, gpus = _cluster()
    if workers is None:
        by_gpu = int(gpus // num_gpus) if num_gpus else jobs
        by_cpu = int(cpus // num_cpus) if num_cpus else (jobs if num_gpus else int(cpus))
        workers = max(1, min(by_gpu, by_cpu))
    if workers * num_cpus > cpus or workers * num_gpus > gpus:
        raise AipaintError(f"{workers} workers need {workers * num_cpus:g} CPUs and {workers * num_gpus:g} GPUs, "
                           f"but the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: ask for fewer workers "
                           "(--ray-workers) or add nodes")
    return max(1, min(workers, jobs))


def _remove_temp_files(jobs: Sequence[BatchJob]) -> None:
    """Delete the temp files a killed worker left behind (``save_png`` writes ``.NAME.TOKEN.tmp`` then renames)."""
    for job in jobs:
        for path in job.files:
            for temp in path.parent.glob(f".{path.name}.*.tmp"):
                try:
                    temp.unlink()
                except OSError:
                    pass


def ray_batch(source: str | Path | Sequence[Any], out_dir: str | Path, *, model: Any = None,
              load_options: dict[str, Any] | None = None, base: GenerationRequest | None = None,
              dynamic: DynamicPrompts | None = None, combinatorial: bool = False, max_prompts: int | None = None,
              post: Sequence[Any] = (), address: str | None = None, workers: int | None = None, num_cpus: float = 1.0,
              num_gpus: float | None = None, images: str = "auto", pipe: Pipeline | None = None,
              init_options: dict[str, Any] | None = None,
              on_progress: Callable[[RayProgress], None] | None = None) -> RayBatchReport:
    """Run a prompts file (or list, see :func:`~aipaint.workflows.batch.read_prompts`) on Ray into
    ``out_dir``, as :func:`~aipaint.workflows.batch.batch` runs it here (same names, same manifest,
    same resume). ``model`` and ``load_options`` are what each worker passes to :func:`aipaint.load`
    (``device="cuda"`` gives each worker a GPU unless ``num_gpus`` says otherwise); ``workers``
    workers (default: as many as the cluster's CPUs, or GPUs, hold), ``num_cpus`` each.
    ``address`` is Ray's (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:10001"``); without one,
    ``$RAY_ADDRESS``, else a Ray started here for the run (``init_options`` go to ``ray.init``);
    a Ray already initialised in this process is used as it is. ``images``: ``"auto"`` (workers
    that see the output folder write there, the others send their images back), ``"shared"`` or
    ``"stream"``. ``pipe``, when this process has the same model loaded, names and checks the jobs
    here instead of on a probe worker."""
    started = time.perf_counter()
    _check_options(images, workers, num_cpus, num_gpus)
    from aipaint.api.request import GenerationRequest
    from aipaint.workflows.common import PromptJob, resolve_request

    lines = read_prompts(source)
    base = base if base is not None else GenerationRequest(prompt="")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameter("output", str(out_dir), "is a file; batch writes into a folder", "give a folder")
    load_options = dict(load_options or {})
    if num_gpus is None:
        num_gpus = 1.0 if str(load_options.get("device", "cpu")).startswith("cuda") else 0.0
    post = tuple(post)
    # Every line's fields and dynamic prompt checked before Ray is contacted (the names come later, with the model's).
    plan_batch(lines, base, out_dir, dynamic=dynamic, combinatorial=combinatorial, max_prompts=max_prompts)
    spec = WorkerSpec(model, load_options, post, str(out_dir.resolve()), images=images)

    import ray

    started_ray = _connect(address, init_options)
    marker: Path | None = None
    try:
        _check_fits(num_cpus, num_gpus)
        probe = None
        if pipe is None:
            probe = ray.remote(Worker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0).remote(spec)
        try:
            salt = batch_salt(pipe, post) if pipe is not None else ray.get(probe.describe.remote())
            if isinstance(salt, tuple):  # the model did not load there
                raise _rebuilt(salt)
            spec = dataclasses.replace(spec, salt=salt)
            jobs = plan_batch(lines, base, out_dir, dynamic=dynamic, combinatorial=combinatorial,
                              max_prompts=max_prompts, salt=salt)
            if pipe is not None:
                for job in jobs:
                    try:
                        pipe.check(job.request)
                    except AipaintError as exc:
                        raise at_line(exc, job.line) from None
            else:
                refused = ray.get(probe.check.remote([(job.line, job.request) for job in jobs]))
                if refused is not None:
                    raise _rebuilt(refused)
        finally:
            if probe is not None:
                ray.kill(probe)

        manifest = Manifest(out_dir / MANIFEST_NAME)
        records = manifest.read()
        report = RayBatchReport(jobs=jobs, manifest=manifest.path)
        done = 0

        def progress(job: BatchJob, status: str, seconds: float = 0.0, worker: dict[str, Any] | None = None) -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(RayProgress(done, len(jobs), job, status, seconds, worker or {}))

        todo: list[BatchJob] = []
        for job in jobs:
            if all(path.is_file() for path in job.files):
                if job.id not in records:
                    manifest.append(recovered(job))
                report.skipped.extend(job.files)
                progress(job, "skipped")
            else:
                todo.append(job)
        if todo:
            report.workers = _pool_size(workers, len(todo), num_cpus, num_gpus)
            if images != "stream":
                out_dir.mkdir(parents=True, exist_ok=True)
                marker = out_dir / f"{MARKER_PREFIX}{secrets.token_hex(8)}"
                marker.write_bytes(b"")
                spec = dataclasses.replace(spec, marker=marker.name)
            tasks = []
            for job in todo:
                if job.resolved:
                    prompt_job = PromptJob(job.request, job.template, job.negative_template)
                else:
                    prompt_job = resolve_request(job.request, dynamic)[0]
                # The seed is fixed here, once: a job retried after a worker died makes the same image.
                prompt_job = dataclasses.replace(prompt_job, request=prompt_job.request.with_seed())
                tasks.append({"job": job, "prompt_job": prompt_job})
            errors = _run_pool(tasks, spec, report, manifest, progress, num_cpus, num_gpus)
            generated = set(report.generated)
            missing = [job for job in todo if not generated.issuperset(job.files)]
            _remove_temp_files(todo)
            if errors:
                first = _rebuilt(errors[0][1])
                lines_failed = sorted({job.line for job, _ in errors})
                message = (f"{len(errors)} of {len(todo)} jobs failed (lines {', '.join(map(str, lines_failed))}); "
                           f"the others are done; run the batch again to retry them. The first: {first}")
                raise _with_message(first, message)
            if missing:
                raise AipaintError(f"{len(missing)} jobs came back from no worker (line {missing[0].line} first); "
                                   "run the batch again to finish them")
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
        if started_ray:
            ray.shutdown()
    report.seconds = time.perf_counter() - started
    return report


def _with_message(exc: AipaintError, message: str) -> AipaintError:
    exc.args = (message, *exc.args[1:])
    return exc


def _run_pool(tasks: list[dict[str, Any]], spec: WorkerSpec, report: RayBatchReport, manifest: Manifest,
              progress: Callable[..., None], num_cpus: float, num_gpus: float) -> list[tuple[BatchJob, Any]]:
    """Map the tasks through Ray Data's actor pool; write what comes back; the errors, by job."""
    import ray
    from ray import cloudpickle

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    rows = [{"index": index, "payload": cloudpickle.dumps(task)} for index, task in enumerate(tasks)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one job a block: a retry redoes one job
    dataset = dataset.map_batches(
        Painter, fn_constructor_kwargs={"spec": spec}, batch_size=1, num_cpus=num_cpus, num_gpus=num_gpus,
        compute=ray.data.ActorPoolStrategy(size=report.workers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT_PER_WORKER))
    finished: set[str] = set()
    errors: list[tuple[BatchJob, Any]] = []
    for row in dataset.iter_rows():
        job: BatchJob = tasks[int(row["index"])]["job"]
        take(job, cloudpickle.loads(row["outcome"]), finished, errors, report, manifest, progress)
    return errors


def take(job: BatchJob, outcome: dict[str, Any], finished: set[str], errors: list[tuple[BatchJob, Any]],
         report: RayBatchReport, manifest: Manifest, progress: Callable[..., None]) -> None:
    """What the driver does with one job's outcome: its error kept, or its images written (when
    the worker sent them back), its record appended, once per job id."""
    from aipaint.api.result import save_png

    if job.id in finished:
        return  # a result delivered twice: recorded once
    if "error" in outcome:
        errors.append((job, outcome["error"]))
        return
    for (image, infotext), path in zip(outcome["images"] or (), job.files):
        save_png(image, path, infotext, overwrite=True)
    manifest.append(outcome["record"])
    finished.add(job.id)
    report.generated.extend(job.files)
    if outcome["worker"].get("restarted"):
        report.by_restarted_workers += 1
    progress(job, outcome["status"], outcome["record"].get("seconds") or 0.0, outcome["worker"])
