"""The torch runtime's oneDNN weight prepacking (``prepack``): same outputs as eager, the packed copy
rebuilt when a weight changes (LoRA patches and their restore), the layers' own forward for
autograd, tracing and other dtypes, copies and pickles, and the runtime option's policy; then the
per-layer kernel choice (NNPACK, MKL, in-place ResNet blocks). benchmarks/cpu_runtimes.py (side
``torch-prepack``) and benchmarks/cpu_kernels.py measure the speed."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from aipaint_plugins.lora.formats import kohya_key
from aipaint_plugins.torch_runtime import apply_prepack, prepack
from aipaint_plugins.torch_runtime.prepack import available, install_prepacked, is_prepacked, remove_prepacked
from safetensors.torch import save_file

import aipaint
from aipaint.errors import InvalidParameter

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN CPU kernels")

GEN = dict(seed=3, width=32, height=32, steps=2, cfg_scale=5.0)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.circular = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
        self.linear = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.circular(self.down(torch.nn.functional.silu(self.conv(x))))
        return self.linear(h.flatten(2).transpose(1, 2))  # (batch, tokens, 6): a 3-D input to the linear layer


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_packed_layers_give_the_eager_outputs():
    model, x = net(), torch.randn(2, 4, 16, 16)
    with torch.inference_mode():
        expected = model(x)
        assert install_prepacked(model) == 3  # both zero-padded convolutions and the linear layer
        assert is_prepacked(model.conv) and is_prepacked(model.linear) and not is_prepacked(model.circular)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        other = torch.randn(1, 4, 24, 24)  # another shape repacks the convolutions for it
        remove_prepacked(model)
        assert not is_prepacked(model.conv)
        plain = model(other)
        install_prepacked(model)
        torch.testing.assert_close(model(other), plain, rtol=1e-4, atol=1e-5)


def test_a_weight_written_in_place_is_repacked_at_the_next_call():
    model, x = net(), torch.randn(1, 4, 16, 16)
    install_prepacked(model)
    with torch.inference_mode():
        before = model(x)
        packed = vars(model.conv)["forward"].packed
        with torch.no_grad():  # what a LoRA patch does, and its restore
            model.conv.weight.mul_(2)
            model.linear.weight.add_(0.5)
        after = model(x)
        assert vars(model.conv)["forward"].packed is not packed
        remove_prepacked(model)
        torch.testing.assert_close(after, model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(after, before)


def test_autograd_tracing_and_other_dtypes_use_the_layers_own_forward():
    model, x = net(), torch.randn(1, 4, 16, 16)
    install_prepacked(model)
    out = model(x)  # autograd on, weights require grad: training works as without packing
    out.sum().backward()
    assert model.conv.weight.grad is not None
    assert vars(model.conv)["forward"].packed is None  # nothing packed
    traced = torch.jit.trace(model, x)
    assert "mkldnn" not in str(traced.graph)  # exporters see plain convolutions
    model = net()
    install_prepacked(model)
    with torch.inference_mode():
        model.double()
        torch.testing.assert_close(model(x.double()), type(model).forward(model, x.double()))
        assert vars(model.conv)["forward"].packed is None


def test_copies_and_pickles_drop_the_packed_weights_and_still_work():
    model, x = net(), torch.randn(1, 4, 16, 16)
    install_prepacked(model)
    with torch.inference_mode():
        expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert is_prepacked(clone.conv) and vars(clone.conv)["forward"].module is clone.conv
        assert vars(clone.conv)["forward"].packed is None
        with torch.inference_mode():
            torch.testing.assert_close(clone(x), expected)
        assert vars(clone.conv)["forward"].packed is not None
    with torch.inference_mode():  # weights made in inference mode have no version counter: not packed
        inner = copy.deepcopy(model)
        torch.testing.assert_close(inner(x), expected)
        assert vars(inner.conv)["forward"].packed is None


def test_the_runtime_option_prepacks_and_generates_the_same_images_with_and_without_a_lora(
        tiny_sd_path, plugin_host, tiny_pipe, tmp_path):
    pipe = aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"prepack": True})
    assert pipe.model.prepacked > 0 and tiny_pipe.model.prepacked == 0  # auto: the tiny UNet is left alone
    assert is_prepacked(pipe.model.unet.conv_in) and not any(
        is_prepacked(m) for m in pipe.model.text_encoder.modules())
    base = kohya_key("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    torch.manual_seed(1)
    save_file({f"{base}.lora_up.weight": torch.randn(64, 4), f"{base}.lora_down.weight": torch.randn(4, 32)},
              str(tmp_path / "style.safetensors"))
    options = {"lora": {"folder": str(tmp_path)}}
    for prompt in ("a cat", "a cat <lora:style:1>", "a cat"):  # the LoRA patched in, then restored
        packed = pixels(pipe.txt2img(prompt, options=options, **GEN))
        plain = pixels(tiny_pipe.txt2img(prompt, options=options, **GEN))
        assert np.abs(packed - plain).max() <= 1, prompt
    assert not np.array_equal(pixels(pipe.txt2img("a cat <lora:style:1>", options=options, **GEN)),
                              pixels(pipe.txt2img("a cat", options=options, **GEN)))


def test_the_option_is_refused_where_it_cannot_apply(tiny_sd_path, plugin_host):
    with pytest.raises(InvalidParameter, match="prepack.*auto, true or false"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"prepack": "yes"})
    with pytest.raises(InvalidParameter, match="compile is on"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"prepack": True, "compile": True})
    with pytest.raises(InvalidParameter, match="runs in bf16"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"prepack": True, "precision": "bf16"})
    off = aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"prepack": False})
    assert off.model.prepacked == 0 and not is_prepacked(off.model.unet.conv_in)


def test_auto_prepacks_an_sd_sized_float32_unet_on_the_cpu_when_the_copies_fit(tiny_pipe, monkeypatch):
    import aipaint_plugins.torch_runtime.precision as precision

    model = copy.deepcopy(tiny_pipe.model)
    assert apply_prepack(model, "auto", "fp32", compiling=False) == 0  # 0.1M parameters: too small
    assert "not SD-sized" in model.prepack_reason
    monkeypatch.setattr(precision, "AUTO_MIN_UNET_PARAMETERS", 1)
    needed = prepack.packed_bytes(model.unet) + prepack.packed_bytes(model.vae)
    for free in (None, 2 * needed - 1):  # unknown, or too little room for the copies
        monkeypatch.setattr(prepack, "available_memory", lambda free=free: free)
        assert apply_prepack(model, "auto", "fp32", compiling=False) == 0
        assert "packed weights would take" in model.prepack_reason
        assert not is_prepacked(model.unet.conv_in)
    assert apply_prepack(model, True, "fp32", compiling=False) > 0  # asked for: memory is the user's call
    assert model.prepack_reason == "requested"
    monkeypatch.setattr(prepack, "available_memory", lambda: 2 * needed)
    model = copy.deepcopy(tiny_pipe.model)
    assert apply_prepack(model, "auto", "fp32", compiling=False) > 0
    assert model.prepack_reason == "auto: float32 on the CPU"
    assert apply_prepack(copy.deepcopy(tiny_pipe.model), "auto", "bf16", compiling=False) == 0
    assert apply_prepack(copy.deepcopy(tiny_pipe.model), "auto", "fp32", compiling=True) == 0


def test_packed_bytes_and_available_memory(tmp_path):
    assert prepack.packed_bytes(net()) == 4 * (8 * 4 * 9 + 8 * 8 * 9 + 6 * 8)  # the circular conv is not packed
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   16000000 kB\n")
    assert prepack.available_memory(meminfo) == 16000000 * 1024
    assert prepack.available_memory(tmp_path / "missing") is None


# -- the per-layer kernel choice: NNPACK for large 3x3 convolutions, MKL for linear layers with many rows,
# -- and diffusers' ResNet blocks with their element-wise steps in place

needs_nnpack = pytest.mark.skipif(not prepack.nnpack_available(), reason="NNPACK does not run on this CPU")


@needs_nnpack
def test_large_3x3_convolutions_run_on_nnpack_one_image_at_a_time(monkeypatch):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    install_prepacked(conv)
    with torch.inference_mode():
        big, small = torch.randn(2, 64, 64, 64), torch.randn(2, 64, 32, 32)
        torch.testing.assert_close(conv(big), type(conv).forward(conv, big), rtol=1e-4, atol=1e-4)
        assert calls == [(1, 64, 64, 64), (1, 64, 64, 64)]  # Winograd, image by image
        assert vars(conv)["forward"].packed is None  # oneDNN's packed copy is not even made
        torch.testing.assert_close(conv(small), type(conv).forward(conv, small), rtol=1e-4, atol=1e-5)
        assert len(calls) == 2 and vars(conv)["forward"].packed is not None  # 32x32: oneDNN
        with torch.no_grad():
            conv.weight.mul_(-1)  # NNPACK reads the weight at every call: a patch is seen at once
        torch.testing.assert_close(conv(big), type(conv).forward(conv, big), rtol=1e-4, atol=1e-4)


@needs_nnpack
def test_a_convolution_nnpack_refuses_falls_back_to_onednn_for_good(monkeypatch):
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    tries = []

    def refuse(*args):
        tries.append(1)
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", refuse)
    install_prepacked(conv)
    x = torch.randn(1, 64, 64, 64)
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(conv(x), type(conv).forward(conv, x), rtol=1e-4, atol=1e-4)
    assert tries == [1] and vars(conv)["forward"].nnpack_failed


@needs_nnpack
def test_32x32_convolutions_take_nnpack_from_512_input_channels(monkeypatch):
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda x, *a: calls.append(x.shape[1]) or real(x, *a))
    for channels in (512, 320):
        conv = torch.nn.Conv2d(channels, 64, 3, padding=1).eval()
        install_prepacked(conv)
        x = torch.randn(1, channels, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(conv(x), type(conv).forward(conv, x), rtol=1e-4, atol=1e-4)
    assert calls == [512]


@pytest.mark.parametrize("kernel, stride, channels, side", [(1, 1, 64, 64), (3, 2, 64, 64), (3, 1, 32, 64),
                                                           (3, 1, 320, 32), (3, 1, 640, 16)])
def test_other_convolutions_stay_on_onednn(monkeypatch, kernel, stride, channels, side):
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: pytest.fail("NNPACK was called"))
    conv = torch.nn.Conv2d(channels, 64, kernel, stride=stride, padding=kernel // 2).eval()
    install_prepacked(conv)
    x = torch.randn(1, channels, side, side)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), type(conv).forward(conv, x), rtol=1e-4, atol=1e-4)
    assert vars(conv)["forward"].packed is not None


def test_linear_layers_take_mkl_from_512_rows_or_on_one_thread_and_onednn_below():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    layer = torch.nn.Linear(16, 8).eval()
    install_prepacked(layer)
    packer = vars(layer)["forward"]
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            few = torch.randn(2, 8, 16)
            torch.testing.assert_close(layer(few), torch.nn.functional.linear(few, layer.weight, layer.bias))
            assert packer.packed is None  # one thread: MKL's sgemm for every row count
            torch.set_num_threads(2)
            many = torch.randn(2, 256, 16)  # 512 rows
            torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight, layer.bias))
            assert packer.packed is None
            torch.testing.assert_close(layer(few), torch.nn.functional.linear(few, layer.weight, layer.bias),
                                       rtol=1e-4, atol=1e-5)
            assert packer.packed is not None  # 16 rows on two threads: oneDNN's packed kernel
    finally:
        torch.set_num_threads(threads)


def resnet_block(**kwargs):
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = ResnetBlock2D(**{"in_channels": 32, "out_channels": 64, "temb_channels": 16, "groups": 8, **kwargs})
    for p in block.parameters():  # non-trivial norms and biases
        torch.nn.init.normal_(p, 0.0, 0.2)
    return block.eval()


@pytest.mark.parametrize("kwargs, temb_shape", [
    ({}, (2, 16)), ({"output_scale_factor": 2.0}, (2, 16)), ({"temb_channels": None}, None),
    ({"temb_channels": None}, (2, 64, 1, 1)),  # no projection: diffusers adds the embedding as given
])
def test_resnet_blocks_run_in_place_with_the_same_outputs_and_leave_their_input_alone(kwargs, temb_shape):
    block = resnet_block(**kwargs)
    x, temb = torch.randn(2, 32, 16, 16), None if temb_shape is None else torch.randn(temb_shape)
    with torch.inference_mode():
        expected = block(x, temb)
        install_prepacked(block)
        assert type(vars(block)["forward"]).__name__ == "InPlaceResnet"
        remove_prepacked(block.conv1), remove_prepacked(block.conv2), remove_prepacked(block.conv_shortcut)
        kept = x.clone()
        assert torch.equal(block(x, temb), expected)  # the same kernels: the very same numbers
        assert torch.equal(x, kept)


def test_resnet_blocks_use_their_own_forward_for_autograd_hooks_and_sampling():
    from diffusers.models.resnet import ResnetBlock2D

    block = resnet_block()
    install_prepacked(block)
    x, temb = torch.randn(1, 32, 8, 8, requires_grad=True), torch.randn(1, 16)
    block(x, temb).sum().backward()  # training: no in-place step on a tensor autograd needs
    assert x.grad is not None
    seen = []
    handle = block.conv2.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.inference_mode():
        out = block(x.detach(), temb)
    handle.remove()
    # the hook kept conv2's output, which the in-place path would have overwritten with the sum
    assert seen[0] is not out and not torch.equal(seen[0], out)
    down = ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, down=True)
    install_prepacked(down)
    assert type(vars(down).get("forward")).__name__ != "InPlaceResnet"  # sampling blocks keep theirs
    assert is_prepacked(down.conv1)
