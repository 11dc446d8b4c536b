"""Token merging: the matching merges what is similar and unmerges losslessly where it can,
it reaches the blocks it should, images stay reproducible, and the UNet is restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aipaint_plugins import tome
from aipaint_plugins.tome import TokenMerging, ToMeSettings, bipartite_soft_matching

from aipaint.errors import InvalidParameter
from aipaint.plugin.adapters import AdapterUnit

GEN = dict(seed=5, steps=4, width=32, height=32, cfg_scale=5.0)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def blocky_tokens(batch: int, height: int, width: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Tokens that are constant inside each 2×2 cell: three of every four are exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randn(batch, channels, height // 2, width // 2, generator=g)
    image = cells.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return image.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("random", [False, True])
def test_merging_duplicates_is_lossless_and_shrinks_the_token_count(random):
    x = blocky_tokens(2, 8, 12, 16)
    generator = torch.Generator().manual_seed(3) if random else None
    r = 3 * (8 * 12) // 4  # every non-destination token has an exact twin at its cell's destination
    merge, unmerge = bipartite_soft_matching(x, 8, 12, stride=2, r=r, generator=generator)
    merged = merge(x)
    assert merged.shape == (2, 8 * 12 - r, 16)
    assert torch.allclose(unmerge(merged), x, atol=1e-6)


def test_merged_tokens_are_averaged_and_copied_back():
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))
    merge, unmerge = bipartite_soft_matching(x, 4, 4, stride=2, r=5)
    restored = unmerge(merge(x))
    assert restored.shape == x.shape
    exact = (restored - x).abs().amax(dim=-1) < 1e-6
    assert int((~exact).sum()) <= 5 + 4  # merged sources and the destinations that absorbed them change
    assert int(exact.sum()) >= 16 - 9
    assert torch.allclose(unmerge(merge(x)).mean(), x.mean(), atol=0.5)
    identity_merge, identity_unmerge = bipartite_soft_matching(x, 4, 4, stride=2, r=0)
    assert identity_merge(x) is x and identity_unmerge(x) is x


def test_only_blocks_within_max_downsample_are_merged(tiny_pipe):
    """The tiny UNet has self-attention only at half resolution: max_downsample 1 leaves it alone."""
    unet = tiny_pipe.model.unet
    x, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.inference_mode():
        plain = unet(x, torch.tensor(300.0), encoder_hidden_states=embeds).sample
    for max_downsample, expect_merges in ((1, False), (2, True)):
        merging = TokenMerging(unet, ToMeSettings(ratio=0.5, max_downsample=max_downsample), seed=1)
        try:
            with torch.inference_mode():
                out = unet(x, torch.tensor(300.0), encoder_hidden_states=embeds).sample
        finally:
            merging.restore()
        assert (merging.merged_calls > 0) == expect_merges
        assert torch.allclose(out, plain, atol=1e-5) != expect_merges


def test_generation_with_tome_is_reproducible_close_and_restored(tiny_pipe):
    units = (AdapterUnit("tome", {"ratio": 0.5, "max_downsample": 2}),)
    plain = pixels(tiny_pipe.txt2img("a red circle", **GEN))
    first = tiny_pipe.txt2img("a red circle", adapters=units, **GEN)
    second = tiny_pipe.txt2img("a red circle", adapters=units, **GEN)
    assert np.array_equal(pixels(first), pixels(second))  # seeded matching: same image twice
    assert 0 < np.abs(pixels(first) - plain).mean() < 25
    assert 'ToMe: "ratio 0.5, max downsample 2"' in first.infotexts[0]
    attn = [m.attn1 for m in tiny_pipe.model.unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]
    assert attn and all("forward" not in vars(a) for a in attn)
    assert not tiny_pipe.model.unet._forward_pre_hooks
    zero = pixels(tiny_pipe.txt2img("a red circle", adapters=(AdapterUnit("tome", {"ratio": 0.0, "max_downsample": 2}),), **GEN))
    assert np.array_equal(zero, plain)


def test_restored_even_when_generation_fails(tiny_pipe, monkeypatch):
    def explode(done: int, total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        tiny_pipe.txt2img("a red circle", adapters=(AdapterUnit("tome", {"max_downsample": 2}),), progress=explode, **GEN)
    attn = [m.attn1 for m in tiny_pipe.model.unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]
    assert all("forward" not in vars(a) for a in attn)
    assert tome.TokenMerging is TokenMerging


@pytest.mark.parametrize(
    "options, message",
    [({"ratio": 0.95}, "ratio"), ({"ratio": "half"}, "ratio"), ({"max_downsample": 3}, "max_downsample"),
     ({"stride": 0}, "stride"), ({"random": 1}, "random"), ({"merge_mlp": True}, "options are")],
)
def test_bad_options_are_refused(tiny_pipe, options, message):
    with pytest.raises(InvalidParameter, match=message):
        tiny_pipe.txt2img("a red circle", adapters=(AdapterUnit("tome", options),), **GEN)


def test_cli_option_is_recorded_and_regenerates_from_the_png(tiny_sd_path, tmp_path, capsys):
    from PIL import Image

    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert cli_main(["generate", "a red circle", "--tome", "0.4:2", "--steps", "3", "-W", "32", "-H", "32",
                     "--seed", "1", "-o", str(first), *common]) == 0
    assert 'ToMe: "ratio 0.4, max downsample 2"' in read_png_parameters(first)
    assert cli_main(["generate", "--from-png", str(first), "-o", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert cli_main(["generate", "a red circle", "--tome", "half", *common, "-o", str(first)]) == 2
    assert "--tome" in capsys.readouterr().err


def test_on_the_embedded_model_the_pictures_keep_their_content():
    """Behaviour: merging half the tokens of the full-resolution blocks keeps what is drawn."""
    from aipaint_plugins.shapes_world.evaluate import adherence
    from aipaint_plugins.shapes_world.scene import random_scene

    import aipaint

    pipe = aipaint.load()
    rng = np.random.default_rng(3)
    captions = [random_scene(rng, "train").caption for _ in range(8)]

    def generate(adapters) -> list:
        return [pipe.txt2img(c, seed=50 + i, adapters=adapters).images[0] for i, c in enumerate(captions)]

    def mean_score(images) -> float:
        return float(np.mean([adherence(image, c).score for image, c in zip(images, captions)]))

    plain_images, merged_images = generate(()), generate((AdapterUnit("tome", {"ratio": 0.5}),))
    # merging really happened: the pictures are not the plain ones
    assert sum(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain_images, merged_images)) >= 6
    plain, merged = mean_score(plain_images), mean_score(merged_images)
    assert plain > 0.6
    assert merged >= plain - 0.08, (plain, merged)
