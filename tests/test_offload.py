"""CPU offloading in the torch runtime (``runtime_options={"offload": "model" | "sequential"}``).

The development machines have no GPU, so the move to a GPU itself is not exercised here.
What is tested: the option's validation, the core's contract that a runtime may load the
weights on another device than the one the model computes on, the ``model`` policy (one
network on the execution device at a time, the previous one sent back first), and that
images through both kinds of hooks equal the plain model's (execution device = CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aipaint_plugins.torch_runtime.offload import Resident, install_offload, model_offload_hook, parse_offload

import aipaint
from aipaint import hookimpl
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.runtimes import RuntimeSpec

GEN = dict(seed=5, steps=3, width=32, height=32)


def test_offload_option_is_validated(tiny_sd_path, plugin_host):
    assert parse_offload({}) == "none" and parse_offload({"offload": "Model"}) == "model"
    with pytest.raises(InvalidParameter, match="offload"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"offload": "disk"})
    with pytest.raises(InvalidParameter, match="nowhere to move"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"offload": "model"})  # device cpu
    with pytest.raises(InvalidParameter, match="choose one"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"offload": "model", "compile": True})


class Recording(torch.nn.Module):
    def __init__(self, name: str, log: list) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.weight = torch.nn.Parameter(torch.ones(1))

    def to(self, *args, **kwargs):  # type: ignore[override]
        self.log.append((self.name, str(args[0])))
        return super().to(*args, **kwargs)

    def forward(self, x):
        return x * self.weight


def test_model_offload_keeps_one_network_on_the_device_and_sends_the_previous_one_back():
    from accelerate.hooks import add_hook_to_module

    log: list = []
    resident = Resident()
    a, b = Recording("a", log), Recording("b", log)
    for module in (a, b):
        add_hook_to_module(module, model_offload_hook(torch.device("cpu"), resident, storage="meta-store"))
    a(torch.ones(1))
    a(torch.ones(1))  # already there: no transfer
    assert log == [("a", "cpu")]
    with pytest.raises(RuntimeError):  # "meta-store" is no device: the hook really sends a back before b comes
        b(torch.ones(1))
    assert log[1] == ("a", "meta-store")


@pytest.fixture(scope="module")
def offloaded(tiny_sd_path, plugin_host):
    """Two copies of the tiny model with the offload hooks installed, computing on the CPU."""
    pipes = {}
    for mode in ("model", "sequential"):
        pipe = aipaint.load(tiny_sd_path, host=plugin_host)
        install_offload(pipe.model.modules(), mode, torch.device("cpu"))
        pipes[mode] = pipe
    return pipes


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_images_through_the_offload_hooks_equal_the_plain_model(offloaded, tiny_pipe, mode):
    pipe = offloaded[mode]
    assert all(hasattr(m, "_hf_hook") or any(hasattr(s, "_hf_hook") for s in m.modules())
               for m in pipe.model.modules().values())
    plain = tiny_pipe.txt2img("a red circle", **GEN).images[0]
    hooked = pipe.txt2img("a red circle", **GEN).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(hooked))
    start = tiny_pipe.txt2img("a blue square", **GEN).images[0]  # img2img runs the VAE's encoder too
    plain = tiny_pipe.img2img(start, "a red circle", denoising_strength=0.6, **GEN).images[0]
    hooked = pipe.img2img(start, "a red circle", denoising_strength=0.6, **GEN).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(hooked))


def test_sequential_offload_holds_no_weights_between_calls_and_refuses_weight_patches(offloaded):
    from aipaint.plugin.kit.patches import PatchSet

    unet = offloaded["sequential"].model.unet
    assert unet.conv_in.weight.device.type == "meta"
    with pytest.raises(UnsupportedFeature, match="offload=model or none"):
        PatchSet().add(("unet", "conv_in"), unet.conv_in.weight, torch.zeros_like(unet.conv_in.weight, device="cpu"))


def test_model_offload_keeps_weight_patches_working(offloaded):
    from aipaint.plugin.kit.patches import PatchSet

    weight = offloaded["model"].model.unet.conv_in.weight
    before = weight.detach().clone()
    patches = PatchSet()
    patches.add(("unet", "conv_in"), weight, torch.full(weight.shape, 0.5))
    with patches.apply():
        assert not torch.equal(weight, before)
    assert torch.equal(weight, before)


class WeightsElsewhere:
    """A runtime that keeps the weights on the CPU for a model that computes on ``meta``."""

    seen: dict = {}

    @hookimpl
    def register_runtimes(self, register):
        def prepare(model, options):
            WeightsElsewhere.seen = {"device": str(model.device), "unet": str(model.unet.device), "options": options}

        register(RuntimeSpec(name="elsewhere", prepare=prepare, weights_device=lambda device, options: "cpu"))


def test_a_runtime_can_load_the_weights_on_another_device_than_the_model_computes_on(tiny_sd_path):
    from aipaint.plugin.host import create_plugin_host

    host = create_plugin_host((WeightsElsewhere(),))
    pipe = aipaint.load(tiny_sd_path, host=host, device="meta", runtime="elsewhere", runtime_options={"x": 1})
    assert WeightsElsewhere.seen == {"device": "meta", "unet": "cpu", "options": {"x": 1}}
    assert str(pipe.model.device) == "meta"

