"""Request validation: every bad value raises a typed error naming parameter, value and range."""

from __future__ import annotations

import pytest

from aipaint.api.request import GenerationRequest
from aipaint.errors import AipaintError, InvalidParameter


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("width", 33, "multiple of 8"),
        ("height", 100, "multiple of 8"),
        ("width", 8, "from 16 to 4096"),
        ("width", 8192, "from 16 to 4096"),
        ("steps", 0, "from 1 to 1000"),
        ("steps", 2.5, "integer"),
        ("cfg_scale", 0.5, "from 1.0 to 30.0"),
        ("cfg_scale", 31, "from 1.0 to 30.0"),
        ("seed", -2, "from -1"),
        ("seed", 2**32, "from -1"),
        ("batch_size", 0, "from 1 to 64"),
        ("clip_skip", 0, "from 1 to 12"),
        ("guidance_rescale", 1.5, "from 0.0 to 1.0"),
        ("emphasis", "loud", "a1111, none"),
        ("sampler", "", "non-empty"),
        ("steps", True, "integer"),
    ],
)
def test_bad_values_raise_typed_errors(field, value, fragment):
    with pytest.raises(InvalidParameter) as err:
        GenerationRequest(prompt="x", **{field: value})
    assert err.value.name == field and err.value.value == value
    assert fragment in str(err.value) and field in str(err.value)
    assert isinstance(err.value, AipaintError)


def test_size_error_suggests_neighbours():
    with pytest.raises(InvalidParameter, match="try 32 or 40"):
        GenerationRequest(prompt="x", width=33)


def test_defaults_follow_the_model_and_seed_is_resolved():
    from aipaint.models.latent import ModelDefaults

    request = GenerationRequest(prompt="x", steps=5).with_defaults(ModelDefaults(width=64, height=48, cfg_scale=4.0))
    assert (request.steps, request.width, request.height, request.cfg_scale) == (5, 64, 48, 4.0)
    seeded = request.with_seed()
    assert seeded.seed >= 0 and seeded.with_seed() is seeded


def test_a1111_defaults():
    from aipaint.models.latent import ModelDefaults

    request = GenerationRequest(prompt="x").with_defaults(ModelDefaults())
    assert (request.steps, request.cfg_scale, request.width, request.height) == (20, 7.0, 512, 512)


def test_request_is_frozen():
    request = GenerationRequest(prompt="x")
    with pytest.raises(AttributeError):
        request.steps = 3  # type: ignore[misc]
