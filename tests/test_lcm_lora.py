"""benchmarks/lcm_lora.py's pure pieces against diffusers' LCMScheduler (what the distilled LoRA is sampled with)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lcm_lora.py"


@pytest.fixture(scope="module")
def lcm():
    spec = importlib.util.spec_from_file_location("lcm_lora_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scheduler():
    # the embedded model's schedule: v-prediction, zero-terminal SNR, trailing spacing
    return diffusers.LCMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing", beta_schedule="scaled_linear",
                                  beta_start=0.00085, beta_end=0.012, original_inference_steps=50)


def test_boundary_scalings_match_lcm_scheduler(lcm):
    s = scheduler()
    ts = torch.tensor([0, 1, 19, 259, 500, 979, 999])
    c_skip, c_out = lcm.boundary_scalings(ts)
    for t, cs, co in zip(ts.tolist(), c_skip.tolist(), c_out.tolist()):
        want_skip, want_out = s.get_scalings_for_boundary_condition_discrete(t)
        assert cs == pytest.approx(want_skip, rel=1e-6, abs=1e-9)
        assert co == pytest.approx(want_out, rel=1e-6)
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(0.0)  # identity at t = 0


def test_solver_timesteps_are_the_schedulers_skipping_schedule(lcm):
    s = scheduler()
    s.set_timesteps(50)
    assert sorted(s.timesteps.tolist()) == lcm.ddim_timesteps(1000, 50).tolist()
    s.set_timesteps(4)
    assert set(s.timesteps.tolist()) <= set(lcm.ddim_timesteps(1000, 50).tolist())


def test_consistency_output_matches_lcm_scheduler_step(lcm):
    """The student's c_skip * x + c_out * x0(v) is what LCMScheduler.step returns as the denoised sample."""
    s = scheduler()
    s.set_timesteps(1)
    t = int(s.timesteps[0])
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ac = s.alphas_cumprod[t]
    x0, eps = lcm.x0_and_eps(v, x, ac.sqrt(), (1 - ac).sqrt())
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([t]))
    ours = c_skip * x + c_out * x0
    theirs = s.step(v, t, x, return_dict=True).denoised
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # x0 and eps reconstruct x: x = a x0 + s eps
    torch.testing.assert_close(ac.sqrt() * x0 + (1 - ac).sqrt() * eps, x, rtol=1e-5, atol=1e-5)
