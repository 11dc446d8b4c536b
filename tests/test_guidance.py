"""The guidance plugin: APG, CFG-Zero* and dynamic thresholding through LoopContributor.guide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aipaint_plugins.guidance.methods import (
    GuidanceContributor,
    _Alphas,
    apg_update,
    mimic_threshold,
    zero_star_scale,
)

from aipaint.errors import InvalidParameter, UnsupportedFeature

GEN = dict(seed=5, steps=6, width=32, height=32, cfg_scale=7.0)
CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def predictions(seed: int = 0, n: int = 1):
    g = torch.Generator().manual_seed(seed)
    neg = torch.randn(2, 4, 8, 8, generator=g)
    pos = [torch.randn(2, 4, 8, 8, generator=g) + 0.5 * neg for _ in range(n)]
    x = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor(500.0), neg, pos


def call(contributor, step=3, cfg=7.0, weights=(1.0,), seed=0):
    x, t, neg, pos = predictions(seed, len(weights))
    plain = neg + sum(w * cfg * (p - neg) for w, p in zip(weights, pos, strict=True))
    out = contributor.guide(step, 10, x=x, t=t, negative=neg, positives=pos, weights=list(weights), cfg_scale=cfg)
    return out, plain, (x, t, neg, pos)


@pytest.mark.parametrize("weights", [(1.0,), (0.7, 0.6)])
def test_apg_with_eta_1_and_nothing_else_is_plain_cfg(weights):
    from aipaint_plugins.guidance import APGOptions

    out, plain, _ = call(GuidanceContributor(APGOptions(eta=1.0), None, None), weights=weights)
    assert torch.allclose(out, plain, atol=1e-5)


def test_apg_removes_the_parallel_part_and_caps_the_norm():
    x, t, neg, (cond,) = predictions()
    diff = cond - neg
    update = apg_update(diff, cond, eta=0.0, norm_threshold=0.0)
    assert torch.allclose((update * cond).flatten(1).sum(1), torch.zeros(2), atol=1e-4)  # orthogonal to cond
    capped = apg_update(diff, cond, eta=1.0, norm_threshold=1.0)
    assert torch.allclose(capped.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5)


def test_cfg_zero_star_matches_a_hand_computation():
    from aipaint_plugins.guidance import CFGZeroStarOptions

    out, _, (x, t, neg, (cond,)) = call(GuidanceContributor(None, CFGZeroStarOptions(zero_init_steps=2), None))
    for i in range(2):
        c, u = cond[i].flatten().double(), neg[i].flatten().double()
        s = float(c @ u / (u @ u))
        expected = s * neg[i] + 7.0 * (cond[i] - s * neg[i])
        assert torch.allclose(out[i], expected.float(), atol=1e-4)
    assert zero_star_scale(neg, neg).flatten().allclose(torch.ones(2))
    zeroed, _, _ = call(GuidanceContributor(None, CFGZeroStarOptions(zero_init_steps=2), None), step=1)
    assert torch.count_nonzero(zeroed) == 0  # zero-init: the first steps' prediction is zero


def test_dynamic_thresholding_clamps_to_the_mimic_spread():
    g = torch.Generator().manual_seed(1)
    target, mimic = 10 * torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    out = mimic_threshold(target, mimic, 0.9)
    around_mean = (out - target.mean(dim=2, keepdim=True)).abs().amax(dim=2)
    mim_max = (mimic - mimic.mean(dim=2, keepdim=True)).abs().amax(dim=2)
    assert torch.allclose(around_mean, mim_max, atol=1e-4)  # clamped, then spread as the mimic scale's
    assert torch.all(out.std(dim=2) < target.std(dim=2) / 3)
    small = mimic_threshold(mimic, mimic, 1.0)
    assert torch.allclose(small, mimic, atol=1e-5)  # a result within the mimic spread is kept


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_clean_latent_conversion_round_trips(prediction_type):
    alphas = _Alphas({**CONFIG, "prediction_type": prediction_type})
    x, t, neg, _ = predictions()
    assert torch.allclose(alphas.from_x0(x, t, alphas.to_x0(x, t, neg), neg), neg, atol=1e-4)


def test_with_the_options_off_the_image_is_unchanged(tiny_pipe):
    plain = pixels(tiny_pipe.txt2img("a red circle", **GEN))
    off = tiny_pipe.txt2img("a red circle", options={"apg": {"enabled": False}}, **GEN)
    assert np.array_equal(pixels(off), plain)
    assert "APG" not in off.infotexts[0]
    same = tiny_pipe.txt2img("a red circle", options={"apg": {"eta": 1.0}}, **GEN)  # APG at eta 1 is CFG
    assert np.abs(pixels(same) - plain).max() <= 1


@pytest.mark.parametrize("options, recorded", [
    ({"apg": {"eta": 0.0, "norm_threshold": 15}}, "APG eta: 0.0, APG norm threshold: 15.0, APG momentum: 0.0"),
    ({"cfg_zero_star": {"zero_init_steps": 1}}, "CFG-Zero star zero-init steps: 1"),
    ({"dynamic_thresholding": {"mimic_scale": 3, "percentile": 0.95}},
     "Dynamic thresholding mimic scale: 3.0, Dynamic thresholding percentile: 0.95"),
])
def test_each_method_changes_the_image_and_is_recorded(tiny_pipe, options, recorded):
    plain = pixels(tiny_pipe.txt2img("a red circle", **GEN))
    result = tiny_pipe.txt2img("a red circle", options=options, **GEN)
    assert not np.array_equal(pixels(result), plain)
    assert recorded in result.infotexts[0]


def test_the_methods_compose(tiny_pipe):
    both = {"apg": {"eta": 0.5}, "cfg_zero_star": {}, "dynamic_thresholding": {"mimic_scale": 4}}
    result = tiny_pipe.txt2img("a red circle AND a blue square", options=both, **GEN)
    assert all(k in result.infotexts[0] for k in ("APG eta", "CFG-Zero star", "Dynamic thresholding"))
    assert np.isfinite(pixels(result)).all()


@pytest.mark.parametrize("options, message", [
    ({"apg": {"eta": 2}}, "apg.eta"),
    ({"apg": {"momentum": 1}}, "apg.momentum"),
    ({"apg": {"norm_threshold": -1}}, "apg.norm_threshold"),
    ({"apg": {"eta": "lots"}}, "apg.eta"),
    ({"cfg_zero_star": {"zero_init_steps": -1}}, "cfg_zero_star.zero_init_steps"),
    ({"dynamic_thresholding": {"percentile": 0}}, "dynamic_thresholding.percentile"),
    ({"dynamic_thresholding": {"mimic_scale": 0.5}}, "dynamic_thresholding.mimic_scale"),
    ({"apg": {"etaa": 0}}, "apg.etaa"),
])
def test_bad_options_are_refused(tiny_pipe, options, message):
    with pytest.raises(InvalidParameter, match=message) as info:
        tiny_pipe.txt2img("a red circle", options=options, **GEN)
    assert "\n" not in str(info.value)


def test_zero_init_with_guidance_rescale_is_refused(tiny_pipe):
    with pytest.raises(UnsupportedFeature, match="guidance rescale"):
        tiny_pipe.txt2img("a red circle", options={"cfg_zero_star": {"zero_init_steps": 1}},
                          guidance_rescale=0.5, **GEN)


def test_cli_option_is_recorded_and_regenerates_from_the_png(tiny_sd_path, tmp_path):
    from PIL import Image

    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert cli_main(["generate", "a red circle", "--option", "apg.eta=0", "--option", "apg.momentum=-0.5",
                     "--steps", "4", "-W", "32", "-H", "32", "--seed", "1", "-o", str(first), *common]) == 0
    assert "APG eta: 0.0, APG norm threshold: 0.0, APG momentum: -0.5" in read_png_parameters(first)
    assert cli_main(["generate", "--from-png", str(first), "-o", str(again), *common]) == 0
    assert "APG momentum: -0.5" in read_png_parameters(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


# --- CFG++ samplers (plugins/samplers: Euler CFG++, Euler a CFG++) -----------------------------
def test_euler_cfg_pp_step_renoises_along_the_unconditional_estimate():
    from aipaint_plugins.samplers.functions import sample_euler_cfg_pp

    g = torch.Generator().manual_seed(0)
    x0_c, x0_u = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    sigmas = torch.tensor([2.0, 0.5, 0.0])

    def denoiser(x, sigma):
        denoiser.unconditional = x0_u + 0 * x
        return x0_c + 0 * x

    x = torch.randn(1, 4, 4, 4, generator=g) * 2
    steps = []
    out = sample_euler_cfg_pp(denoiser, x.clone(), sigmas, noise_sampler=None, callback=lambda d: steps.append(d["x"].clone()))
    first = x0_c + (x - x0_u) / 2.0 * 0.5
    torch.testing.assert_close(steps[0], first)
    torch.testing.assert_close(out, x0_c)  # the last step lands on the guided estimate (sigma 0)


def test_cfg_pp_equals_euler_when_the_negative_equals_the_prompt(tiny_pipe):
    """With the same text on both sides the unconditional prediction is the guided one: CFG++ is Euler."""
    same = dict(prompt="a red circle", negative_prompt="a red circle", **{**GEN, "cfg_scale": 3.0})
    euler = tiny_pipe.txt2img(sampler="Euler", **same)
    cfgpp = tiny_pipe.txt2img(sampler="Euler CFG++", **same)
    assert np.abs(pixels(euler) - pixels(cfgpp)).max() <= 1
    other = tiny_pipe.txt2img(sampler="Euler CFG++", **{**same, "negative_prompt": "blue"})
    assert np.abs(pixels(other) - pixels(cfgpp)).mean() > 0.5
    assert "Sampler: Euler CFG++" in cfgpp.infotexts[0]


def test_cfg_pp_asks_for_the_negative_even_at_cfg_1(tiny_pipe):
    rows = []
    unet = tiny_pipe.model.unet
    handle = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        plain = tiny_pipe.txt2img("a red circle", "blue", sampler="Euler", **{**GEN, "cfg_scale": 1.0})
        n_plain = list(rows)
        rows.clear()
        cfgpp = tiny_pipe.txt2img("a red circle", "blue", sampler="Euler CFG++", **{**GEN, "cfg_scale": 1.0})
    finally:
        handle.remove()
    assert set(n_plain) == {1} and set(rows) == {2}
    assert np.abs(pixels(plain) - pixels(cfgpp)).mean() > 0.1  # x0(cond) + sigma' * eps(uncond) is not Euler


def test_euler_a_cfg_pp_is_seeded_and_differs_from_euler_cfg_pp(tiny_pipe):
    a1 = tiny_pipe.txt2img("a red circle", "blue", sampler="Euler a CFG++", **{**GEN, "cfg_scale": 2.0})
    a2 = tiny_pipe.txt2img("a red circle", "blue", sampler="euler_ancestral_cfg_pp", **{**GEN, "cfg_scale": 2.0})
    det = tiny_pipe.txt2img("a red circle", "blue", sampler="Euler CFG++", **{**GEN, "cfg_scale": 2.0})
    assert np.array_equal(pixels(a1), pixels(a2))
    assert np.abs(pixels(a1) - pixels(det)).mean() > 0.5
