"""Text-to-image on tiny random models: parity with diffusers, seeds, batch, results."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from aipaint_plugins.samplers import builtin_samplers

from aipaint.engine.plans import _make_scheduler

CASES = [(s, sched) for s in builtin_samplers() if s.kind == "scheduler" for sched in s.schedules]

# The parity reference, written out from diffusers' documentation rather than read from the
# plugin or aipaint.engine.samplers.SCHEDULES, so a wrong class or a dropped option shows up.
REFERENCE_SCHEDULERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DDIM": ("DDIMScheduler", {"clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {"clip_sample": False}),
}
REFERENCE_SCHEDULE_OPTIONS = {
    "Automatic": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}


def reference_scheduler(base_config: dict, sampler: str, schedule: str, seeds: list[int]):
    import diffusers

    name, options = REFERENCE_SCHEDULERS[sampler]
    options = {**options, **REFERENCE_SCHEDULE_OPTIONS[schedule]}
    if sampler == "DPM++ SDE":
        options["noise_sampler_seed"] = seeds
    return getattr(diffusers, name).from_config(base_config, **options)


def noise_levels(scheduler) -> list[torch.Tensor]:
    """What a schedule type changes: the timesteps, and the sigmas where the scheduler has them."""
    levels = [scheduler.timesteps.float()]
    if getattr(scheduler, "sigmas", None) is not None:
        levels.append(scheduler.sigmas.float())
    return levels


@pytest.fixture(scope="module")
def reference(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, dict(ref.scheduler.config)


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])


@pytest.mark.parametrize(("spec", "schedule"), CASES, ids=[f"{s.name}-{sc}" for s, sc in CASES])
def test_matches_diffusers_pipeline(tiny_pipe, reference, spec, schedule):
    ref, base_config = reference
    seeds = [11, 12]
    ours = tiny_pipe.txt2img(
        "a red circle", "blue", steps=4, cfg_scale=7, sampler=spec.name, schedule=schedule, seed=11, width=32, height=32, batch_size=2
    )
    ref.scheduler = reference_scheduler(base_config, spec.name, schedule, seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = ref(
        "a red circle", negative_prompt="blue", num_inference_steps=4, guidance_scale=7, generator=generators,
        height=32, width=32, num_images_per_prompt=2, output_type="pil",
    ).images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3
    # On this tiny model some schedule types change the pixels by less than the tolerance above
    # (Euler Karras vs Automatic: 6e-4), so the noise levels themselves are compared too.
    plan = spec.plan(tiny_pipe.model.scheduler_config, schedule, 4, seeds=seeds)
    for our_levels, their_levels in zip(noise_levels(plan.scheduler), noise_levels(ref.scheduler), strict=True):
        torch.testing.assert_close(our_levels, their_levels)
    if schedule != "Automatic":
        automatic = reference_scheduler(base_config, spec.name, "Automatic", seeds)
        automatic.set_timesteps(4)
        assert any(
            a.shape != b.shape or not torch.allclose(a, b) for a, b in zip(noise_levels(automatic), noise_levels(ref.scheduler))
        ), f"{schedule} gives {spec.name} the same noise levels as Automatic: this case could not tell them apart"


def test_scheduler_option_it_does_not_accept_is_an_error():
    from aipaint.engine.samplers import SamplerSpec
    from aipaint.errors import PluginError

    spec = SamplerSpec(name="Euler a", kind="scheduler", scheduler_class="EulerAncestralDiscreteScheduler",
                       schedules=("Automatic", "Karras"))
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear"}
    with pytest.raises(PluginError, match="EulerAncestralDiscreteScheduler does not accept the option.*use_karras_sigmas"):
        spec.plan(config, "Karras", 4)
    with pytest.raises(PluginError, match="solver_order"):
        _make_scheduler("EulerDiscreteScheduler", config, {"solver_order": 3})


@pytest.mark.parametrize("sampler", ["DPM++ SDE", "LMS"])
def test_a1111_infotext_with_karras_schedule_regenerates(tiny_pipe, sampler):
    from aipaint.api.request import GenerationRequest
    from aipaint.infotext import Infotext, generation_kwargs

    text = f"a red circle\nSteps: 3, Sampler: {sampler}, Schedule type: Karras, CFG scale: 7, Seed: 4, Size: 32x32"
    request = GenerationRequest(**generation_kwargs(Infotext.from_text(text)))
    result = tiny_pipe.generate(request)
    assert "Schedule type: Karras" in result.infotexts[0] and f"Sampler: {sampler}," in result.infotexts[0]


def test_guidance_rescale_matches_diffusers(tiny_pipe, reference):
    ref, base_config = reference
    ours = tiny_pipe.txt2img("a cat", steps=3, sampler="Euler", seed=5, width=32, height=32, guidance_rescale=0.7)
    ref.scheduler = reference_scheduler(base_config, "Euler", "Automatic", [5])
    theirs = ref("a cat", num_inference_steps=3, guidance_scale=7, guidance_rescale=0.7,
                 generator=[torch.Generator().manual_seed(5)], height=32, width=32, output_type="pil").images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3


def test_function_sampler_runs_and_is_deterministic(tiny_pipe):
    a = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=1, width=32, height=32)
    b = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=1, width=32, height=32)
    c = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=2, width=32, height=32)
    assert np.array_equal(as_array(a.images), as_array(b.images))
    assert not np.array_equal(as_array(a.images), as_array(c.images))


def sample_dpm_2(denoiser, x, sigmas, *, noise_sampler, callback=None):
    """k-diffusion's DPM2: a second model call at the log-midpoint between two schedule sigmas."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = (x_2 - denoiser(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_without_callback(denoiser, x, sigmas, *, noise_sampler, callback=None):
    """Euler steps that never report them: breaks the function-sampler contract."""
    for i in range(len(sigmas) - 1):
        x = x + (x - denoiser(x, sigmas[i])) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


class FunctionSamplersPlugin:
    from aipaint import hookimpl

    @hookimpl
    def register_samplers(self, register):
        from aipaint.engine.samplers import SamplerSpec

        register(SamplerSpec(name="Test DPM2 fn", kind="function", function=sample_dpm_2, schedules=("Automatic", "Karras")))
        register(SamplerSpec(name="Test silent fn", kind="function", function=sample_without_callback, schedules=("Karras",)))


@pytest.fixture(scope="module")
def test_samplers_pipe(tiny_pipe):
    from aipaint import Pipeline
    from aipaint.plugin.host import create_plugin_host

    return Pipeline(tiny_pipe.model, create_plugin_host(extra_plugins=(FunctionSamplersPlugin(),)))


def conditioning_steps_asked(pipe, sampler: str, steps: int, denoising_start: int = 0) -> list[int]:
    """The step of every conditioning lookup the loop makes (one per model call)."""
    from engine_support import record_job

    from aipaint.api.request import GenerationRequest
    from aipaint.engine.modes import LatentImg2Img
    from aipaint.engine.run import generate

    request = GenerationRequest(prompt="a [cat:dog:0.5]", steps=steps, sampler=sampler, schedule="Karras",
                                seed=1, width=32, height=32)
    # A run that starts at step ``denoising_start``: img2img from latents at the strength that leaves it.
    side = 32 // pipe.model.vae_scale_factor
    start_latents = torch.zeros(1, pipe.model.latent_channels, side, side)
    mode = LatentImg2Img(start_latents, (steps - denoising_start) / steps) if denoising_start else None
    with record_job() as job:
        generate(pipe.model, request, host=pipe.host, mode=mode)
    return job.conditioning_steps


def test_midpoint_model_calls_see_the_step_in_progress(tiny_pipe, test_samplers_pipe):
    """A second-order function sampler's in-between call belongs to the step it is part of
    (it used to be sent to the first step, so prompt editing saw [cat] again mid-run)."""
    # DPM++ 2S a: two calls per step except the last (its ancestral step goes straight to 0).
    assert conditioning_steps_asked(tiny_pipe, "DPM++ 2S a", 4) == [0, 0, 1, 1, 2, 2, 3]
    assert conditioning_steps_asked(tiny_pipe, "DPM++ 2S a", 4, denoising_start=2) == [2, 2, 3]
    assert conditioning_steps_asked(test_samplers_pipe, "Test DPM2 fn", 3) == [0, 0, 1, 1, 2]


def test_function_sampler_that_never_reports_a_step_is_an_error(test_samplers_pipe):
    from aipaint.errors import PluginError

    with pytest.raises(PluginError, match="'Test silent fn' reported 0 finished steps for a run of 3"):
        test_samplers_pipe.txt2img("a cat", steps=3, sampler="Test silent fn", schedule="Karras", seed=1, width=32, height=32)


def levels_apart(a, b) -> int:
    """The largest difference between two images, in 8-bit levels."""
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# The promise (docs/parameters.md): batch item i is the single image with seed + i within one
# 8-bit level per value. CPU kernels may round differently for different batch shapes (seen on
# an AVX-512 Xeon), so bit-identity holds only for the same request.
BATCH_LEVELS = 1


def test_batch_item_i_uses_seed_plus_i(tiny_pipe):
    batch = tiny_pipe.txt2img("a dog", steps=3, seed=40, width=32, height=32, batch_size=3, sampler="Euler a")
    assert batch.seeds == [40, 41, 42]
    single = tiny_pipe.txt2img("a dog", steps=3, seed=42, width=32, height=32, sampler="Euler a")
    assert levels_apart(batch.images[2], single.image) <= BATCH_LEVELS
    # The tolerance cannot hide a wrong seed: the neighbouring seed's item is far from it.
    assert levels_apart(batch.images[1], single.image) > 20 * BATCH_LEVELS
    assert "Seed: 42" in batch.infotexts[2] and "Seed: 40" in batch.infotexts[0]


def test_random_seed_is_recorded(tiny_pipe):
    result = tiny_pipe.txt2img("a dog", steps=2, width=32, height=32)
    assert 0 <= result.seeds[0] < 2**32
    again = tiny_pipe.txt2img("a dog", steps=2, width=32, height=32, seed=result.seeds[0])
    assert np.array_equal(as_array(result.images), as_array(again.images))


def test_same_request_is_bit_identical_across_processes(tiny_pipe, tiny_sd_path):
    """The promise is for the same request (a batch included) on the same machine with the same
    thread count, so the other process gets this one's thread count."""
    ours = tiny_pipe.txt2img("a (red:1.2) house", steps=3, seed=77, width=32, height=32, sampler="DPM++ SDE", batch_size=2)
    digest = hashlib.sha256(b"".join(np.asarray(i).tobytes() for i in ours.images)).hexdigest()
    code = (
        f"import hashlib, numpy as np, torch, aipaint; torch.set_num_threads({torch.get_num_threads()});"
        f"r = aipaint.load({str(tiny_sd_path)!r}).txt2img('a (red:1.2) house', steps=3, seed=77, width=32, height=32,"
        " sampler='DPM++ SDE', batch_size=2);"
        "print(hashlib.sha256(b''.join(np.asarray(i).tobytes() for i in r.images)).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == digest


def test_cfg_scale_one_skips_negative_prompt(tiny_pipe):
    a = tiny_pipe.txt2img("a dog", "a cat", steps=2, seed=3, width=32, height=32, cfg_scale=1)
    b = tiny_pipe.txt2img("a dog", "something else", steps=2, seed=3, width=32, height=32, cfg_scale=1)
    c = tiny_pipe.txt2img("a dog", "something else", steps=2, seed=3, width=32, height=32, cfg_scale=5)
    assert np.array_equal(as_array(a.images), as_array(b.images))
    assert not np.array_equal(as_array(b.images), as_array(c.images))


def dog_with_negative(pipe, negative: str) -> np.ndarray:
    return as_array(pipe.txt2img("a dog", negative, steps=2, seed=3, width=32, height=32, cfg_scale=7).images)


def test_negative_prompt_and_is_text_as_in_a1111(tiny_pipe):
    """A1111 splits only the prompt at AND; a negative's AND is a word (CLIP lower-cases it).
    Only its first part used to reach the model."""
    from aipaint.prompt import PromptWarning

    with pytest.warns(PromptWarning, match="AND in the negative prompt is plain text"):
        anded = dog_with_negative(tiny_pipe, "red AND blue")
    assert np.array_equal(anded, dog_with_negative(tiny_pipe, "red and blue"))
    assert not np.array_equal(anded, dog_with_negative(tiny_pipe, "red"))


def test_negative_prompt_tag_is_text_as_in_a1111(tiny_pipe):
    """A1111 reads <lora:…> tags only in the prompt; in the negative they are words (the tag used
    to vanish). "< lora:…>" is not a tag but gives CLIP the same tokens."""
    from aipaint.prompt import PromptWarning

    with pytest.warns(PromptWarning, match="<lora:ink:0.8> in the negative prompt is plain text"):
        tagged = dog_with_negative(tiny_pipe, "blurry <lora:ink:0.8>")
    assert np.array_equal(tagged, dog_with_negative(tiny_pipe, "blurry < lora:ink:0.8>"))
    assert not np.array_equal(tagged, dog_with_negative(tiny_pipe, "blurry"))


def test_result_carries_parameters_and_timings(tiny_pipe, tmp_path):
    from aipaint.infotext import Infotext, read_png_parameters

    result = tiny_pipe.txt2img("a tree", "fog", steps=3, seed=9, width=32, height=40, sampler="Euler", schedule="Karras", clip_skip=2)
    assert result.image.size == (32, 40)
    assert set(result.timings) >= {"denoise", "decode", "total"}
    path = result.save(tmp_path / "out.png")
    info = Infotext.from_text(read_png_parameters(path))
    assert info.prompt == "a tree" and info.negative_prompt == "fog"
    assert info.params["Sampler"] == "Euler" and info.params["Schedule type"] == "Karras"
    assert info.params["Seed"] == "9" and info.params["Size"] == "32x40" and info.params["Clip skip"] == "2"
    assert len(info.params["Model hash"]) == 10


def test_model_hash_is_sha256_prefix_of_weights(tiny_pipe, tiny_sd_path):
    weights = tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors"
    assert tiny_pipe.model.model_hash == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def test_unknown_sampler_lists_valid_ones(tiny_pipe):
    from aipaint.errors import UnknownName

    with pytest.raises(UnknownName) as err:
        tiny_pipe.txt2img("x", sampler="Eulr", width=32, height=32)
    assert "Euler a" in str(err.value) and "DPM++ 2M" in str(err.value)


def test_schedule_not_allowed_for_sampler(tiny_pipe):
    from aipaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="schedule"):
        tiny_pipe.txt2img("x", sampler="Euler a", schedule="Karras", width=32, height=32)


def test_lora_tag_without_lora_adapter_is_an_error(tiny_sd_path):
    import os

    import aipaint
    from aipaint.errors import UnsupportedFeature
    from aipaint.plugin.host import create_plugin_host

    old = os.environ.get("AIPAINT_LOAD_PLUGINS")
    os.environ["AIPAINT_LOAD_PLUGINS"] = "sd15,samplers,torch"
    try:
        host = create_plugin_host()
    finally:
        if old is None:
            del os.environ["AIPAINT_LOAD_PLUGINS"]
        else:
            os.environ["AIPAINT_LOAD_PLUGINS"] = old
    pipe = aipaint.load(tiny_sd_path, host=host)
    with pytest.raises(UnsupportedFeature, match="lora"):
        pipe.txt2img("a cat <lora:style:0.8>", steps=2, width=32, height=32)


@pytest.mark.parametrize("written", ["SGM Uniform", "sgm_uniform", "sgm-uniform", "Sgm Uniform"])
def test_schedule_names_read_as_a1111_labels_or_api_names(written):
    spec = next(s for s in builtin_samplers() if s.name == "Euler")
    assert spec.check_schedule(written) == "SGM Uniform"


def test_sgm_uniform_is_trailing_timesteps_ending_before_zero(tiny_pipe):
    """k-diffusion's sgm_uniform: timesteps evenly spaced from the last training step, the last left out."""
    spec = next(s for s in builtin_samplers() if s.name == "Euler")
    plan = spec.plan(tiny_pipe.model.scheduler_config, "SGM Uniform", 4)
    train = tiny_pipe.model.scheduler_config.get("num_train_timesteps", 1000)
    assert [round(float(t)) for t in plan.scheduler.timesteps] == [train - 1, 3 * train // 4 - 1, train // 2 - 1, train // 4 - 1]


def test_a_schedule_named_as_a1111s_api_names_it_is_recorded_as_its_label(tiny_pipe):
    result = tiny_pipe.txt2img("a cat", steps=2, seed=1, width=32, height=32, sampler="Euler", schedule="sgm_uniform")
    assert "Schedule type: SGM Uniform" in result.infotexts[0]
    same = tiny_pipe.txt2img("a cat", steps=2, seed=1, width=32, height=32, sampler="Euler", schedule="SGM Uniform")
    assert np.array_equal(np.asarray(result.image), np.asarray(same.image))
