"""Scale-out on Ray: the prompts-file batch on a local Ray cluster (a head and two worker nodes,
started here on this machine and stopped at the end), a worker killed mid-batch, and the HTTP API
on Ray Serve. The embedded 32x32 model keeps each image cheap; most of the time is Ray starting
processes and each worker importing torch and loading the model once."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

import aipaint  # noqa: E402
from aipaint.api.request import GenerationRequest  # noqa: E402
from aipaint.errors import AipaintError, InvalidParameter, ModelLoadError, UnknownName  # noqa: E402
from aipaint.infotext import Infotext, read_png_parameters  # noqa: E402
from aipaint.workflows import batch  # noqa: E402
from aipaint.workflows.batch import (  # noqa: E402
    BatchJob,
    Manifest,
    batch_salt,  # noqa: E402
    plan_batch,
    read_prompts,
)
from aipaint.workflows.common import PromptJob  # noqa: E402
from aipaint.workflows.ray_batch import (  # noqa: E402
    Painter,
    RayBatchReport,
    Worker,
    WorkerSpec,
    _rebuilt,
    ray_batch,
    take,
)

OBJECT_STORE = 100 * 2**20  # bytes per node; the images are 32x32
BASE = GenerationRequest("", steps=6)


class CountingPipe:
    def __init__(self, pipe) -> None:
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, request, progress=None, *, preview=None):
        self.calls += 1
        return self.pipe.generate(request, progress, preview=preview)


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Raise TimeoutError in this (the main) thread when the block runs longer than ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: the driver's) and two worker nodes of one CPU each, on this machine."""
    from ray.cluster_utils import Cluster

    threads_before = set(threading.enumerate())
    with deadline(120, "starting the Ray cluster"):
        local = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        try:
            for _ in range(2):
                local.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
            local.wait_for_nodes()
            ray.init(address=local.address, logging_level="WARNING")
        except BaseException:
            local.shutdown()
            raise
    try:
        yield local
    finally:
        with deadline(60, "stopping the Ray cluster"):
            ray.shutdown()
            local.shutdown()
        # Nothing the cluster started may outlive it in the test process (see conftest: a leftover poller thread
        # once made an unrelated test fail).
        left = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        assert not left, f"threads left running after the Ray cluster stopped: {left}"


@pytest.fixture(scope="module")
def pipe():
    return aipaint.load()


def write_prompts(path: Path, count: int) -> Path:
    lines = [{"prompt": f"a {colour} circle on the left", "seed": 10 + i}
             for i, colour in zip(range(count - 2), ["red", "blue", "green", "yellow"] * count)]
    lines.append({"prompt": "a big red square", "seed": 3, "batch_size": 2})  # one job, two files
    lines.append({"prompt": "a small blue triangle", "n_iter": 2})  # two jobs, random seeds
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def pixels(path_or_image) -> np.ndarray:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    return np.asarray(image.convert("RGB"))


def request_from_png(path: Path) -> GenerationRequest:
    params = Infotext.from_text(read_png_parameters(path))
    return GenerationRequest(params.prompt, steps=int(params.params["Steps"]), seed=int(params.params["Seed"]))


# --- on the cluster --------------------------------------------------------------------------------
def test_a_worker_killed_mid_batch_loses_only_its_in_flight_jobs(cluster, pipe, tmp_path):
    prompts, out = write_prompts(tmp_path / "prompts.jsonl", 8), tmp_path / "out"  # 9 jobs, 10 images
    events, killed = [], []

    def on_progress(event):
        events.append(event)
        if event.status == "generated" and not killed:  # its worker has more jobs in flight: kill it now
            killed.append(event.worker["pid"])
            os.kill(event.worker["pid"], signal.SIGKILL)

    with deadline(300, "the Ray batch"):  # a loaded 2-core machine needs ~100 s
        report = ray_batch(prompts, out, base=BASE, workers=2, num_cpus=0.5, pipe=pipe, on_progress=on_progress)
    assert isinstance(report, RayBatchReport) and report.workers == 2 and killed
    records = records_of(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == len(report.jobs) == 9  # every job done, each recorded once
    assert sorted(e.job.id for e in events) == sorted(ids) and [e.index for e in events] == list(range(1, 10))
    files = sorted(name for r in records for name in r["files"])
    assert sorted(p.name for p in out.glob("*.png")) == files and len(files) == 10
    assert sorted(p.name for p in report.generated) == files
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp file, no marker left
    # The dead worker's in-flight jobs were retried by its restarted replacement.
    restarted = [r for r in records if r["worker"]["restarted"]]
    assert report.by_restarted_workers == len(restarted) >= 1
    assert all(r["worker"]["pid"] != killed[0] for r in restarted)
    # Each image is the one its request makes here, the retried ones too.
    for record in (restarted[0], records[0]):
        path = out / record["files"][0]
        assert np.array_equal(pixels(path), pixels(pipe.generate(request_from_png(path)).images[0]))
    twice = [r for r in records if len(r["files"]) == 2][0]
    assert twice["seeds"] == [3, 4] and twice["prompt"] == "a big red square"

    # The local batch's names and manifest: it finds every job done, and a re-run on Ray too.
    local = CountingPipe(pipe)
    assert len(batch(local, prompts, out, base=BASE).skipped) == 10 and local.calls == 0
    with deadline(60, "the Ray re-run"):
        again = ray_batch(prompts, out, base=BASE, workers=2, num_cpus=0.5, pipe=pipe)
    assert again.generated == [] and len(again.skipped) == 10 and len(records_of(out)) == 9
    mine = batch(pipe, [{"prompt": "a red circle", "seed": 1}], tmp_path / "local", base=BASE)
    assert set(records_of(tmp_path / "local")[0]) == set(records[0]) - {"worker"} and mine.generated


def test_the_command_line_runs_a_batch_on_ray_with_the_model_only_on_the_workers(cluster, tmp_path, capsys):
    from aipaint.cli.main import main

    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text('a big red circle\n--prompt "a blue square" --seed 5 --n_iter 2\na {big|small} green circle\n',
                       encoding="utf-8")
    args = ["batch", str(prompts), "-o", str(out), "--steps", "2", "--dynamic"]
    with deadline(300, "aipaint batch --ray"):
        assert main([*args, "--ray", cluster.address, "--ray-workers", "1"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 4 and "[4/4] line" in captured.err
    records = records_of(out)
    assert sorted(r["line"] for r in records) == [1, 2, 2, 3] and [r["seeds"] for r in records if r["line"] == 2] in (
        [[5], [6]], [[6], [5]])
    dynamic = [r for r in records if r["line"] == 3][0]  # resolved by the driver, from the seed it fixed
    assert dynamic["template"] == "a {big|small} green circle" and dynamic["prompt"] in ("a big green circle",
                                                                                        "a small green circle")
    assert len({r["worker"]["pid"] for r in records}) == 1  # one worker, its model loaded once
    assert main(args) == 0 and "0 images generated, 4 done before" in capsys.readouterr().err  # the local batch's names
    assert main(["batch", str(prompts), "--ray-workers", "2"]) == 2
    assert "--ray-workers needs --ray" in capsys.readouterr().err


def test_workers_the_cluster_cannot_place_are_refused_before_anything_runs(cluster, pipe, tmp_path):
    prompts, out = write_prompts(tmp_path / "prompts.jsonl", 3), tmp_path / "out"
    with deadline(30, "a refused batch"):
        with pytest.raises(AipaintError, match="device cuda.*has 0 GPUs"):
            ray_batch(prompts, out, load_options={"device": "cuda"}, pipe=pipe)
        with pytest.raises(AipaintError, match="5 workers need 5 CPUs .* has 2 CPUs"):
            ray_batch(prompts, out, workers=5, pipe=pipe)
    assert not out.exists()


def test_the_http_api_on_ray_serve(cluster, pipe, tmp_path):
    import httpx
    from fastapi.testclient import TestClient
    from ray import serve

    from aipaint.serve.app import ServerConfig, create_app
    from aipaint.serve.ray_serve import build_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ServerConfig(queue_size=3, output_dir=tmp_path / "outputs")
    body = {"prompt": "a big red circle on the left, on a white background", "steps": 4, "seed": 7, "width": 32,
            "height": 32}
    try:
        with deadline(300, "Ray Serve"):
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            serve.run(build_app(config, num_replicas=1, num_cpus=0.5), name="aipaint", route_prefix="/")
            url = f"http://127.0.0.1:{port}/sdapi/v1"
            answer = httpx.post(f"{url}/txt2img", json=body, timeout=60)
            flags = httpx.get(f"{url}/cmd-flags", timeout=30).json()
            refused = httpx.post(f"{url}/txt2img", json={**body, "steps": 0}, timeout=30)
    finally:
        with deadline(60, "stopping Ray Serve"):
            serve.shutdown()
    assert answer.status_code == 200, answer.text
    served = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    here = TestClient(create_app(config, pipe)).post("/sdapi/v1/txt2img", json=body).json()
    assert np.array_equal(pixels(served), pixels(Image.open(io.BytesIO(base64.b64decode(here["images"][0])))))
    assert json.loads(answer.json()["info"])["seed"] == 7
    assert flags["queue_size"] == 3  # the replica runs the config it was given
    assert refused.status_code == 422 and "steps" in refused.json()["detail"] and "\n" not in refused.json()["detail"]


# --- the pieces, in this process ------------------------------------------------------------------
def _tasks(out: Path, pipe, lines) -> tuple[list[BatchJob], list[dict]]:
    jobs = plan_batch(read_prompts(lines), BASE, out, salt=batch_salt(pipe))
    return jobs, [{"job": job, "prompt_job": PromptJob(job.request.with_seed())} for job in jobs]


def test_stream_mode_sends_the_images_back_and_the_driver_writes_them(pipe, tmp_path):
    out = tmp_path / "out"
    jobs, tasks = _tasks(out, pipe, [{"prompt": "a red circle", "seed": 2, "batch_size": 2}])
    painter = Painter(WorkerSpec(None, {}, (), str(out), images="stream", salt=batch_salt(pipe)))
    outcome = painter.run(tasks[0])
    assert outcome["status"] == "generated" and len(outcome["images"]) == 2 and not out.exists()  # nothing written there
    report, finished, errors = RayBatchReport(jobs=jobs), set(), []
    manifest = Manifest(out / "manifest.jsonl")
    for _ in range(2):  # delivered twice: written and recorded once
        take(jobs[0], outcome, finished, errors, report, manifest, lambda *a: None)
    assert [p.name for p in out.glob("*.png")] and report.generated == jobs[0].files and len(records_of(out)) == 1
    assert Infotext.from_text(read_png_parameters(jobs[0].files[1])).params["Seed"] == "3"


def test_a_retried_job_whose_files_are_there_is_not_generated_again(pipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".aipaint-ray-test").write_bytes(b"")
    jobs, tasks = _tasks(out, pipe, [{"prompt": "a red circle", "seed": 2}])
    painter = Painter(WorkerSpec(None, {}, (), str(out), marker=".aipaint-ray-test", salt=batch_salt(pipe)))
    assert painter.shared
    first = painter.run(tasks[0])
    assert first["status"] == "generated" and first["images"] is None and jobs[0].files[0].is_file()
    written = jobs[0].files[0].stat().st_mtime_ns
    time.sleep(0.01)
    second = painter.run(tasks[0])  # the retry of an attempt that wrote its file and died
    assert second["status"] == "recovered" and second["record"]["recovered"] is True
    assert jobs[0].files[0].stat().st_mtime_ns == written
    # A worker whose model is not the one the jobs were named for refuses them.
    other = Painter(WorkerSpec(None, {}, (), str(out), salt={"model": "other [0]", "post": []}))
    with pytest.raises(AipaintError, match="every node must have the same model"):
        raise _rebuilt(other.run(tasks[0])["error"])


def test_the_probe_refuses_a_request_naming_its_line_with_its_type(pipe):
    worker = Worker(WorkerSpec())
    assert worker.describe() == batch_salt(pipe)
    refused = worker.check([(1, GenerationRequest("a")), (2, GenerationRequest("b", sampler="Nope"))])
    error = _rebuilt(refused)
    assert isinstance(error, UnknownName) and str(error).startswith("line 2: ") and error.value == "Nope"
    assert worker.check([(1, GenerationRequest("a"))]) is None
    missing = Worker(WorkerSpec("no-such-model"))  # a model that does not load: a one-line error, not a dead actor
    assert isinstance(_rebuilt(missing.describe()), ModelLoadError) and missing.check([]) == missing.describe()


def test_bad_options_are_refused_before_ray_starts(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    started = ray.is_initialized()
    for kwargs, match in (({"images": "nfs"}, "images"), ({"workers": 0}, "workers"), ({"num_cpus": -1}, "num_cpus")):
        with pytest.raises(InvalidParameter, match=match):
            ray_batch(prompts, tmp_path / "out", **kwargs)
    prompts.write_text("a red circle\n--prompt x --steps 0\n", encoding="utf-8")
    with deadline(30, "a refused batch"), pytest.raises(InvalidParameter, match="line 2: invalid steps=0"):
        ray_batch(prompts, tmp_path / "out", address="127.0.0.1:1")  # a Ray that is not there is never called
    assert ray.is_initialized() == started and not (tmp_path / "out").exists()


def test_serve_deployment_options_and_the_serve_run_builder():
    from aipaint.serve.app import ServerConfig
    from aipaint.serve.ray_serve import app_builder, deployment_options

    fixed = deployment_options(ServerConfig(queue_size=5), num_replicas=3, num_cpus=2)
    assert fixed == {"ray_actor_options": {"num_cpus": 2, "num_gpus": 0.0}, "max_ongoing_requests": 5,
                     "max_queued_requests": 5, "num_replicas": 3}
    scaled = deployment_options(ServerConfig(load_options={"device": "cuda"}), min_replicas=1, max_replicas=4)
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert scaled["ray_actor_options"]["num_gpus"] == 1.0 and "num_replicas" not in scaled
    with pytest.raises(InvalidParameter, match="num_replicas"):
        deployment_options(ServerConfig(), num_replicas=2, max_replicas=3)
    with pytest.raises(InvalidParameter, match="max_replicas"):
        deployment_options(ServerConfig(), min_replicas=3, max_replicas=2)
    with pytest.raises(InvalidParameter, match="did you mean .num_replicas"):
        app_builder({"replica": "2"})
    with pytest.raises(InvalidParameter, match="queue_size"):
        app_builder({"queue_size": "many"})
    assert app_builder({"model": "shapes-tiny", "max_replicas": "2", "device": "cpu", "api_auth": "a:b"}) is not None


def test_importing_the_ray_batch_module_imports_neither_ray_nor_torch():
    import subprocess
    import sys

    code = ("import sys, aipaint.workflows.ray_batch; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr

