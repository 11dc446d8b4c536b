"""DeepCache: the shallow branch is exact given fresh deep features, caching follows the interval,
and the UNet is restored afterwards. (Speed and image quality: benchmarks/speed_features.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from aipaint_plugins import deepcache
from aipaint_plugins.deepcache import DeepCacheSettings, DeepCacheUNet, skip_layout
from aipaint_plugins.onnx_runtime.export import residual_layout

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.adapters import AdapterUnit
from aipaint.plugin.kit.patches import check_patchable_unet

GEN = dict(seed=5, steps=6, width=32, height=32, cfg_scale=5.0)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def unit(**options) -> tuple[AdapterUnit, ...]:
    return (AdapterUnit("deepcache", options),)


@pytest.mark.parametrize("branch", range(4))  # every skip connection of the tiny UNet
@pytest.mark.parametrize("size", [16, 18])  # 18: not a multiple of the up-sampling factor (explicit sizes)
def test_the_shallow_branch_reproduces_the_full_unet_given_fresh_deep_features(tiny_pipe, size, branch):
    unet = tiny_pipe.model.unet
    g = torch.Generator().manual_seed(size)
    x, embeds = torch.randn(2, 4, size, size, generator=g), torch.randn(2, 77, 32, generator=g)
    residuals = [torch.randn(2, channels, -(-size // 2**level), -(-size // 2**level), generator=g)
                 for channels, level in residual_layout(unet)]  # what a ControlNet hands the UNet
    control = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
    for kwargs in ({}, control):
        wrapper = DeepCacheUNet(unet, DeepCacheSettings(interval=10, branch=branch))
        try:
            with torch.inference_mode():
                full = unet(x, torch.tensor(400.0), encoder_hidden_states=embeds, **kwargs).sample
                shallow = unet(x, torch.tensor(400.0), encoder_hidden_states=embeds, **kwargs).sample
        finally:
            wrapper.restore()
        assert wrapper.stats.full_calls == 1 and wrapper.stats.cached_calls == 1
        assert torch.allclose(full, shallow, atol=1e-5)


def test_cached_calls_follow_the_interval_and_change_the_image_a_little(tiny_pipe, monkeypatch):
    made: list[DeepCacheUNet] = []
    monkeypatch.setattr(deepcache, "DeepCacheUNet", lambda *a: made.append(DeepCacheUNet(*a)) or made[-1])
    plain = pixels(tiny_pipe.txt2img("a red circle", **GEN))
    cached = tiny_pipe.txt2img("a red circle", adapters=unit(interval=3), **GEN)
    assert (made[0].stats.full_calls, made[0].stats.cached_calls) == (2, 4)  # full at calls 0 and 3 of 6
    difference = np.abs(pixels(cached) - plain)
    assert 0 < difference.mean() < 20
    assert 'DeepCache: "interval 3, branch 1"' in cached.infotexts[0]  # branch defaults to 1
    every_call = pixels(tiny_pipe.txt2img("a red circle", adapters=unit(interval=1), **GEN))
    assert np.array_equal(every_call, plain)  # interval 1 caches nothing


def test_the_unet_is_restored_after_generation_and_after_an_error(tiny_pipe):
    unet = tiny_pipe.model.unet
    assert "forward" not in vars(unet)
    tiny_pipe.txt2img("a red circle", adapters=unit(interval=2), **GEN)
    assert "forward" not in vars(unet) and not unet.up_blocks[-1]._forward_pre_hooks

    def explode(done: int, total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tiny_pipe.txt2img("a red circle", adapters=unit(interval=2), progress=explode, **GEN)
    assert "forward" not in vars(unet) and not unet.up_blocks[-1]._forward_pre_hooks


@pytest.mark.parametrize(
    "options, message",
    [({"interval": 0}, "interval"), ({"interval": 2.5}, "interval"), ({"branch": 4}, "from 0 to 3"), ({"depth": 1}, "options are")],
)
def test_bad_options_are_refused(tiny_pipe, options, message):
    with pytest.raises(InvalidParameter, match=message):
        tiny_pipe.txt2img("a red circle", adapters=unit(**options), **GEN)


def test_skip_layout_matches_the_unet(tiny_pipe):
    """conv_in, down block 0 (one layer + down-sampler), down block 1 (one layer); consumed deepest first."""
    layout = skip_layout(tiny_pipe.model.unet)
    assert [(s.channels, s.down_block, s.down_layer) for s in layout] == [(32, -1, 0), (32, 0, 0), (32, 0, -1), (64, 1, 0)]
    assert [(s.up_block, s.up_layer) for s in layout] == [(1, 1), (1, 0), (0, 1), (0, 0)]


def test_other_runtimes_and_compiled_unets_are_refused():
    with pytest.raises(UnsupportedFeature, match="'onnxruntime' runtime"):
        check_patchable_unet(SimpleNamespace(runtime="onnxruntime", unet=None), "DeepCache")
    compiled = SimpleNamespace(runtime="torch", unet=SimpleNamespace(_compiled_call_impl=object()))
    with pytest.raises(UnsupportedFeature, match="torch.compile"):
        check_patchable_unet(compiled, "DeepCache")


def test_cli_option_is_recorded_and_regenerates_from_the_png(tiny_sd_path, tmp_path, capsys):
    from PIL import Image

    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert cli_main(["generate", "a red circle", "--deepcache", "3:1", "--steps", "4", "-W", "32", "-H", "32",
                     "--seed", "1", "-o", str(first), *common]) == 0
    assert 'DeepCache: "interval 3, branch 1"' in read_png_parameters(first)
    assert cli_main(["generate", "--from-png", str(first), "-o", str(again), *common]) == 0
    assert 'DeepCache: "interval 3, branch 1"' in read_png_parameters(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert cli_main(["generate", "a red circle", "--deepcache", "three", *common, "-o", str(first)]) == 2
    assert "--deepcache" in capsys.readouterr().err


def test_on_the_embedded_model_the_pictures_keep_their_content():
    """Behaviour: with the default DeepCache the shapes, colours and places asked for are still drawn."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import random_scene

    import aipaint

    pipe = aipaint.load()
    rng = np.random.default_rng(3)
    captions = [random_scene(rng, "train").caption for _ in range(8)]

    def mean_score(adapters) -> float:
        return float(np.mean([adherence(pipe.txt2img(c, seed=50 + i, adapters=adapters).images[0], c).score
                              for i, c in enumerate(captions)]))

    plain, cached = mean_score(()), mean_score(unit())
    assert plain > 0.6  # the model draws what it is asked
    assert cached >= plain - 0.08, (plain, cached)
