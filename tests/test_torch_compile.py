"""The torch runtime's torch.compile options: validation, what gets compiled with which settings,
and a real (cheap, backend="eager") compile that still generates the same image.

Inductor itself is not exercised: compiling an SD UNet takes minutes on this CPU (NOTES.md);
benchmarks/gpu.py measures it where a GPU exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aipaint_plugins.torch_runtime import CompileOptions, is_compiled, prepare_torch

import aipaint
from aipaint.errors import InvalidParameter

GEN = dict(seed=2, steps=2, width=32, height=32)


def test_compile_is_off_by_default_and_its_options_need_it():
    assert CompileOptions.parse({}, "cpu") is None
    with pytest.raises(InvalidParameter, match="only meaningful with compile=True"):
        CompileOptions.parse({"compile_mode": "default"}, "cpu")
    with pytest.raises(InvalidParameter, match="accepts"):
        CompileOptions.parse({"compile": True, "compile_modes": "x"}, "cpu")


def test_defaults_depend_on_the_device():
    cpu = CompileOptions.parse({"compile": True}, "cpu")
    cuda = CompileOptions.parse({"compile": True}, "cuda")
    assert (cpu.components, cpu.mode, cpu.backend, cpu.fullgraph, cpu.dynamic) == (("unet",), "default", "inductor", False, None)
    assert cuda.mode == "reduce-overhead"  # CUDA graphs where they exist
    assert CompileOptions.parse({"compile": True, "compile_components": "unet, vae"}, "cpu").components == ("unet", "vae")


@pytest.mark.parametrize(
    "options, field",
    [
        ({"compile": "yes"}, "compile"),
        ({"compile": True, "compile_mode": "fastest"}, "compile_mode"),
        ({"compile": True, "compile_backend": "eager", "compile_mode": "default"}, "compile_mode"),
        ({"compile": True, "compile_components": ["unet", "text_encoder"]}, "compile_components"),
        ({"compile": True, "compile_fullgraph": 1}, "compile_fullgraph"),
        ({"compile": True, "compile_dynamic": "auto"}, "compile_dynamic"),
    ],
)
def test_bad_compile_options_are_refused(options, field):
    with pytest.raises(InvalidParameter, match=field):
        CompileOptions.parse(options, "cpu")


def test_prepare_compiles_the_chosen_modules_in_place_with_the_settings(tiny_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    model = tiny_pipe.model
    unet_before = model.unet
    prepare_torch(model, {"compile": True, "compile_components": ["unet", "vae"], "compile_mode": "max-autotune",
                          "compile_fullgraph": True, "compile_dynamic": False})
    assert model.unet is unet_before  # in place: names and weights unchanged for adapters
    assert [module for module, _ in calls] == [model.unet, model.vae.decoder]
    assert calls[0][1] == {"backend": "inductor", "fullgraph": True, "dynamic": False, "mode": "max-autotune"}
    calls.clear()
    prepare_torch(model, {"compile": True, "compile_backend": "eager"})
    assert calls == [(model.unet, {"backend": "eager", "fullgraph": False, "dynamic": None})]


def test_a_real_compile_generates_the_same_image(tiny_sd_path, plugin_host, tiny_pipe):
    compiled = aipaint.load(tiny_sd_path, host=plugin_host,
                            runtime_options={"compile": True, "compile_backend": "eager", "compile_components": ["vae"]})
    assert is_compiled(compiled.model.vae.decoder) and not is_compiled(compiled.model.unet)
    a = np.asarray(compiled.txt2img("a red circle", **GEN).images[0])
    b = np.asarray(tiny_pipe.txt2img("a red circle", **GEN).images[0])
    assert np.array_equal(a, b)
