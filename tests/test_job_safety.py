"""Jobs on one loaded model never see each other's state: two threads with different LoRAs get
the images of running the same requests one after the other, the weights are bit-identical
afterwards, and speed features' module patches end with their job.

These use the embedded model (zoo/models/shapes-tiny) at 4 steps: about a second per image on a CPU.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.lora.formats import kohya_key, patchable_modules
from image_modes_support import load_embedded
from safetensors.torch import save_file

from aipaint.plugin.adapters import AdapterUnit

GEN = dict(seed=11, steps=4, cfg_scale=5.0)
PROMPT = "a big red circle in the center, on a white background"


@pytest.fixture(scope="module")
def pipe(plugin_host):
    return load_embedded(plugin_host)


def cross_attention_value(pipe) -> tuple[str, torch.nn.Module]:
    """The first cross-attention value projection of the UNet: a LoRA there moves the image."""
    modules = patchable_modules(pipe.model.unet)
    name = next(n for n in modules if n.endswith("attn2.to_v"))
    return name, modules[name]


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory) -> Path:
    """Two kohya LoRAs on the same weight with different random directions."""
    folder = tmp_path_factory.mktemp("loras")
    name, linear = cross_attention_value(pipe)
    out_features, in_features = linear.weight.shape
    for file, seed in (("first", 1), ("second", 2)):
        g = torch.Generator().manual_seed(seed)
        base = kohya_key("unet", name)
        save_file({f"{base}.lora_up.weight": torch.randn(out_features, 4, generator=g),
                   f"{base}.lora_down.weight": torch.randn(4, in_features, generator=g),
                   f"{base}.alpha": torch.tensor(4.0)}, str(folder / f"{file}.safetensors"))
    return folder


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe.model, c).state_dict().items()}


def generate(pipe, lora: str, folder: Path, progress=None) -> np.ndarray:
    result = pipe.txt2img(f"{PROMPT} <lora:{lora}:1.5>", options={"lora": {"folder": str(folder)}}, progress=progress, **GEN)
    return np.asarray(result.images[0])


def test_two_threads_with_different_loras_get_the_sequential_images(pipe, loras):
    before = weights(pipe)
    first, second = generate(pipe, "first", loras), generate(pipe, "second", loras)
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 1  # the LoRAs really differ

    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    first_running = threading.Event()

    def slow_start(done: int, total: int) -> None:
        # Keep the first job in its loop while the second thread asks for the model.
        first_running.set()
        time.sleep(0.1)

    def job(lora: str, progress=None) -> None:
        try:
            results[lora] = generate(pipe, lora, loras, progress)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=("first", slow_start)), threading.Thread(target=job, args=("second",))]
    threads[0].start()
    assert first_running.wait(30)
    threads[1].start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert np.array_equal(results["first"], first)
    assert np.array_equal(results["second"], second)
    after = weights(pipe)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_the_job_lock_is_what_keeps_jobs_apart(pipe, loras, monkeypatch):
    """Without the lock, a second job patches the weights under the first and restores them out of
    order: the first image changes and the base weights stay patched. The test above can fail."""
    import contextlib

    from aipaint.engine import run

    before = weights(pipe)
    first = generate(pipe, "first", loras)
    monkeypatch.setattr(run, "job_lock", lambda model: contextlib.nullcontext())
    results: dict[str, np.ndarray] = {}
    first_in_loop, second_in_loop, first_done = threading.Event(), threading.Event(), threading.Event()

    def first_waits(done: int, total: int) -> None:
        if done == 1:
            first_in_loop.set()
            second_in_loop.wait(30)

    def second_waits(done: int, total: int) -> None:
        if done == 1:
            second_in_loop.set()
            first_done.wait(30)

    def first_job() -> None:
        try:
            results["first"] = generate(pipe, "first", loras, first_waits)
        finally:
            first_done.set()

    thread = threading.Thread(target=first_job)
    thread.start()
    try:
        assert first_in_loop.wait(30)
        generate(pipe, "second", loras, second_waits)
    finally:
        second_in_loop.set()
        thread.join(60)
        corrupted = [k for k, v in weights(pipe).items() if not torch.equal(v, before[k])]
        for component in ("unet", "text_encoder"):
            getattr(pipe.model, component).load_state_dict(
                {k.split(".", 1)[1]: v for k, v in before.items() if k.startswith(component + ".")})
    assert not np.array_equal(results["first"], first)
    assert corrupted


@pytest.mark.parametrize("unit", [AdapterUnit("deepcache", {"interval": 2}), AdapterUnit("tome", {"ratio": 0.5, "max_downsample": 2})],
                         ids=["deepcache", "tome"])
def test_speed_features_end_with_their_job(pipe, unit):
    unet = pipe.model.unet
    forwards = {name: vars(module).get("forward") for name, module in unet.named_modules()}
    plain = np.asarray(pipe.txt2img(PROMPT, **GEN).images[0])
    patched = np.asarray(pipe.txt2img(PROMPT, adapters=(unit,), **GEN).images[0])
    assert not np.array_equal(patched, plain)  # the feature did act during its job
    assert {name: vars(module).get("forward") for name, module in unet.named_modules()} == forwards
    assert np.array_equal(np.asarray(pipe.txt2img(PROMPT, **GEN).images[0]), plain)
