"""A loaded model can be copied (``copy.deepcopy``) after it ran jobs: the copy gets its own job lock."""

from __future__ import annotations

import numpy as np

import aipaint

GEN = dict(seed=5, steps=3, width=32, height=32)


def test_a_model_that_ran_a_job_can_be_copied_and_the_copy_runs_with_its_own_lock(tiny_sd_path, plugin_host):
    import copy

    pipe = aipaint.load(tiny_sd_path, host=plugin_host)
    first = pipe.txt2img("a red circle", **GEN).images[0]
    assert hasattr(pipe.model, "_job_lock")
    twin = aipaint.Pipeline(copy.deepcopy(pipe.model), plugin_host)
    assert not hasattr(twin.model, "_job_lock")
    assert np.array_equal(np.asarray(first), np.asarray(twin.txt2img("a red circle", **GEN).images[0]))
    assert twin.model._job_lock is not pipe.model._job_lock
