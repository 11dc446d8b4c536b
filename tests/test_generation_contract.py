"""The generation contract: typed plugin options, capabilities checked first, live previews."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

import aipaint
from aipaint.api.options import OptionGroup, parse_assignments, parse_bool
from aipaint.api.request import GenerationRequest
from aipaint.errors import InvalidParameter, UnsupportedFeature

EMBEDDED_PROMPT = "a big red circle on the left, on a white background"


@dataclass(frozen=True)
class StyleOptions(OptionGroup):
    namespace: ClassVar[str] = "style"
    strength: float = 0.5
    enabled: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.strength <= 1:
            raise InvalidParameter("style.strength", self.strength, "must be from 0 to 1")


KNOWN = {"style": StyleOptions}


# --- typed options ---------------------------------------------------------------------------
def test_a_mapping_becomes_the_typed_group_with_text_converted():
    request = GenerationRequest("x", options={"style": {"strength": "0.25", "enabled": "false", "name": "ink"}})
    typed = request.with_typed_options(KNOWN)
    assert typed.option(StyleOptions) == StyleOptions(strength=0.25, enabled=False, name="ink")


def test_an_unset_group_reads_as_its_defaults():
    assert GenerationRequest("x").option(StyleOptions) == StyleOptions()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"styel": {}}, "did you mean 'style'"),
        ({"style": {"strenght": 0.3}}, "did you mean 'strength'"),
        ({"style": {"strength": 2}}, "from 0 to 1"),
        ({"style": {"enabled": "nope"}}, "true or false"),
        ({"style": {"strength": "1e999"}}, "finite number"),
        ({"style": "strength=1"}, "mapping"),
    ],
)
def test_bad_options_are_typed_errors_naming_what_is_wrong(options, message):
    with pytest.raises(InvalidParameter, match=message):
        GenerationRequest("x", options=options).with_typed_options(KNOWN)


def test_security_opt_ins_never_read_words_as_truth():
    assert parse_bool("allow_pickle", "false") is False and parse_bool("x", "Yes") is True
    with pytest.raises(InvalidParameter):
        parse_bool("allow_pickle", "no thanks")
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        GenerationRequest("x", allow_pickle="no")


def test_cli_assignments_parse_by_namespace():
    assert parse_assignments(["style.strength=0.3", "style.name=a=b"]) == {"style": {"strength": "0.3", "name": "a=b"}}
    with pytest.raises(InvalidParameter, match="NAMESPACE.OPTION=VALUE"):
        parse_assignments(["strength=0.3"])


def test_the_pipeline_checks_options_against_the_installed_plugins(tiny_pipe):
    with pytest.raises(InvalidParameter, match="did you mean 'lora'"):
        tiny_pipe.txt2img("x", steps=1, width=32, height=32, options={"lroa": {"folder": "/tmp"}})


def test_a_plugin_registers_its_option_group_and_reads_it_in_a_job(tiny_sd_path):
    seen = []

    class Plugin:
        @aipaint.hookimpl
        def register_options(self, register):
            register(StyleOptions)

        @aipaint.hookimpl
        def register_adapters(self, register):
            from contextlib import contextmanager

            from aipaint.plugin.adapters import AdapterActivation, AdapterSpec

            @contextmanager
            def activate(context):
                seen.append(context.request.option(StyleOptions))
                yield AdapterActivation()

            register(AdapterSpec("style", activate, wants=lambda context: True))

    host = aipaint.create_plugin_host(extra_plugins=(Plugin(),))
    pipe = aipaint.Pipeline.load(tiny_sd_path, host=host)
    pipe.txt2img("x", steps=1, width=32, height=32, seed=1, options={"style": {"strength": "0.75"}})
    assert seen == [StyleOptions(strength=0.75)]


# --- capabilities ------------------------------------------------------------------------------
def test_a_mode_the_model_lacks_is_refused_before_any_work(tiny_pipe, monkeypatch):
    import aipaint.engine.run

    monkeypatch.setattr(type(tiny_pipe.model), "capabilities", frozenset({"txt2img"}))
    monkeypatch.setattr(aipaint.engine.run, "generate", lambda *a, **k: pytest.fail("the engine ran"))
    with pytest.raises(UnsupportedFeature, match=r"sd15 model .* cannot do image to image \(img2img\)"):
        tiny_pipe.img2img(np.zeros((32, 32, 3), np.uint8), "x")
    with pytest.raises(UnsupportedFeature, match="variations"):
        tiny_pipe.variations(np.zeros((32, 32, 3), np.uint8))


def test_request_modes():
    image = np.zeros((16, 16, 3), np.uint8)
    assert GenerationRequest("x").mode == "txt2img"
    assert GenerationRequest("x", init_image=image).mode == "img2img"
    assert GenerationRequest("x", init_image=image, mask=np.full((16, 16), 255, np.uint8)).mode == "inpaint"
    assert GenerationRequest("x", init_image=image, outpaint_left=8).mode == "outpaint"
    assert GenerationRequest("x", image_prompts=(image,)).mode == "variations"
    assert GenerationRequest("x", image_prompts=(image, image), image_prompt_weights=(1, 3)).mode == "blend"
    with pytest.raises(InvalidParameter, match="one weight per image"):
        GenerationRequest("x", image_prompts=(image, image), image_prompt_weights=(1,))


# --- live preview --------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_x0_estimate_inverts_the_forward_process(prediction_type):
    from aipaint.engine.preview import X0Estimator

    estimate = X0Estimator({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                            "beta_end": 0.012, "prediction_type": prediction_type})
    torch.manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor(600)
    alpha = float(estimate.alphas_cumprod[600])
    x_t = alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise
    output = noise if prediction_type == "epsilon" else alpha**0.5 * noise - (1 - alpha) ** 0.5 * x0
    assert torch.allclose(estimate(x_t, t, output), x0, atol=1e-4)


@pytest.fixture(scope="module")
def embedded():
    return aipaint.load()


class LinearLatents:
    """A stand-in for a model whose VAE is linear in colour (as SD's nearly is): each latent
    pixel is a fixed mix of its 4x4 patch's mean colour."""

    vae_scale_factor = 4

    def __init__(self) -> None:
        self.mix = torch.tensor([[0.8, -0.2, 0.1, 0.5], [0.1, 0.9, -0.3, 0.2], [-0.4, 0.2, 0.7, 0.1]])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.avg_pool2d(images, 4)
        return torch.einsum("nchw,cd->ndhw", patches, self.mix) + 0.3


def test_the_cheap_preview_fits_a_linear_vae_exactly():
    from aipaint.engine.preview import cheap_rgb, latent_colour_map

    model = LinearLatents()
    fitted = latent_colour_map(model)
    assert fitted.error < 1e-4
    colours = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    latents = model.encode(colours.repeat_interleave(4, 2).repeat_interleave(4, 3))
    assert torch.allclose(cheap_rgb(latents, fitted.matrix), colours, atol=1e-3)


def test_auto_previews_decode_where_the_latent_is_not_linear(embedded):
    from aipaint.engine.preview import CHEAP_MAX_ERROR, latent_colour_map

    assert latent_colour_map(embedded.model).error > CHEAP_MAX_ERROR  # the toy VAE mixes colour non-linearly
    previews = []
    embedded.txt2img(EMBEDDED_PROMPT, seed=3, steps=4, preview=previews.append)
    assert np.array_equal(np.asarray(previews[-1].image()), np.asarray(previews[-1].image("full")))


def test_previews_come_every_step_and_end_near_the_picture(embedded):
    previews = []
    result = embedded.txt2img(EMBEDDED_PROMPT, seed=3, steps=10, preview=previews.append)
    assert [p.step for p in previews] == list(range(1, 11)) and {p.total for p in previews} == {10}
    final = np.asarray(result.image, dtype=np.float32)
    last = np.asarray(previews[-1].image("full"), dtype=np.float32)
    first = np.asarray(previews[0].image("full"), dtype=np.float32)
    assert np.abs(last - final).mean() < 8  # the last estimate is (nearly) the picture
    assert np.abs(first - final).mean() > np.abs(last - final).mean()
    assert np.asarray(previews[-1].image("cheap")).shape == final.shape  # latent size, scaled up


def test_a_preview_does_not_change_the_picture(embedded):
    plain = embedded.txt2img(EMBEDDED_PROMPT, seed=4, steps=6)
    watched = embedded.txt2img(EMBEDDED_PROMPT, seed=4, steps=6, preview=lambda step: step.image())
    assert np.array_equal(np.asarray(plain.image), np.asarray(watched.image))


def test_a_blend_needs_two_to_five_images(tiny_pipe):
    image = np.zeros((32, 32, 3), np.uint8)
    for images in ([image], [image] * 6):
        with pytest.raises(InvalidParameter, match="2 to 5 images"):
            tiny_pipe.blend(images)
