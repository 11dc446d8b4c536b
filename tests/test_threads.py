"""The torch runtime's ``threads`` option: tiny models' jobs run on one thread by default, a number
asked for is used, torch's count comes back after the job, and overlapping jobs share one count.
The speed it buys is measured by benchmarks/embedded_model.py (its warm-image row)."""

from __future__ import annotations

import types

import pytest
import torch
from aipaint_plugins.torch_runtime import TINY_UNET_PARAMETERS, apply_threads

import aipaint
from aipaint.engine.run import intra_op_threads
from aipaint.errors import InvalidParameter

GEN = dict(seed=1, width=32, height=32, steps=2, cfg_scale=5.0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def threads_seen_by_a_job(pipe) -> list[int]:
    seen: list[int] = []
    pipe.txt2img("a red circle", progress=lambda done, total: seen.append(torch.get_num_threads()), **GEN)
    return seen


def test_a_tiny_model_runs_its_jobs_on_one_thread_and_gives_the_count_back(tiny_pipe, two_threads):
    assert tiny_pipe.model.intra_op_threads == 1
    assert "too small to share between cores" in tiny_pipe.model.threads_reason
    assert threads_seen_by_a_job(tiny_pipe) == [1, 1]
    assert torch.get_num_threads() == two_threads


def test_a_number_asked_for_is_used_for_the_job(tiny_sd_path, plugin_host, two_threads):
    pipe = aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"threads": "3"})  # as the CLI passes it
    assert (pipe.model.intra_op_threads, pipe.model.threads_reason) == (3, "requested")
    assert threads_seen_by_a_job(pipe) == [3, 3]
    assert torch.get_num_threads() == two_threads


@pytest.mark.parametrize("value", [0, -1, "many", True, 1.5])
def test_a_bad_thread_count_is_refused(tiny_sd_path, plugin_host, value):
    with pytest.raises(InvalidParameter, match="threads"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"threads": value})


def test_larger_models_keep_torchs_count():
    with torch.device("meta"):  # parameters without memory
        unet = torch.nn.Linear(4000, TINY_UNET_PARAMETERS // 4000 + 1)
    model = types.SimpleNamespace(unet=unet, device="cpu")
    apply_threads(model, "auto")
    assert model.intra_op_threads is None and model.threads_reason == "auto: torch's thread count"
    small = types.SimpleNamespace(unet=torch.nn.Linear(4, 4), device="cuda")
    apply_threads(small, "auto")  # a GPU model's work is not on the CPU's threads
    assert small.intra_op_threads is None and "computes on cuda" in small.threads_reason


def test_overlapping_jobs_get_the_largest_count_and_the_first_count_comes_back(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
        with intra_op_threads(3):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == two_threads
    with intra_op_threads(None):
        assert torch.get_num_threads() == two_threads


def test_a_job_that_fails_still_gives_the_count_back(tiny_pipe, two_threads):
    seen: list[int] = []

    def fail(done: int, total: int) -> None:  # called inside the job, after its first step
        seen.append(torch.get_num_threads())
        raise RuntimeError("the job failed")

    with pytest.raises(RuntimeError, match="the job failed"):
        tiny_pipe.txt2img("a red circle", progress=fail, **GEN)
    assert seen == [1] and torch.get_num_threads() == two_threads
