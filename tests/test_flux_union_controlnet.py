"""Union ControlNets for FLUX (InstantX's / Shakker-Labs' FLUX.1-dev-Controlnet-Union: diffusers'
``FluxControlNetModel`` with ``num_mode``), checked against diffusers' ``FluxControlNetPipeline``
(``control_mode=...``) and ``FluxMultiControlNetModel`` (a list of modes), on the tiny random FLUX
of tests/test_flux.py; and the refusal of a control type for ControlNets of one type. (An SD 3.5-style
``SD3ControlNetModel`` is compared with diffusers in tests/test_sd3.py.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_flux import PROMPT, as_array, dev, flux_paths, noise_picture, quantised  # noqa: F401  (fixtures)

from aipaint.errors import InvalidParameter

TINY_FLUX_CONTROLNET = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8],
    "guidance_embeds": True,
}


@pytest.fixture(scope="module")
def union_controlnets(tmp_path_factory) -> dict[str, Path]:
    """A union ControlNet (7 modes, as InstantX's) and one of a single type, in the tiny transformer's
    shapes; diffusers zero-initialises their projections, so they are drawn at random here."""
    from diffusers import FluxControlNetModel

    root = tmp_path_factory.mktemp("flux-union-controlnets")
    for seed, (name, overrides) in enumerate({"union": {"num_mode": 7}, "single": {}}.items()):
        torch.manual_seed(20 + seed)
        controlnet = FluxControlNetModel(**TINY_FLUX_CONTROLNET, **overrides)
        with torch.no_grad():
            for p in controlnet.parameters():
                if not p.abs().max():
                    p.normal_(0.0, 0.3)
        controlnet.save_pretrained(root / name)
    return {"union": root / "union", "single": root / "single"}


@pytest.fixture
def mean_vae_posterior(monkeypatch):
    """diffusers samples the control image's VAE posterior (with the generator); aipaint takes its mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


def unit(path, seed: int = 5, **options):
    from aipaint.plugin.adapters import AdapterUnit

    return AdapterUnit("controlnet", {"model": path, "image": noise_picture(32, seed=seed), **options})


KW = dict(steps=3, seed=7, width=32, height=32)


def diffusers_flux(model, path: Path, controlnet, **call):
    from diffusers import FluxControlNetPipeline

    ref = FluxControlNetPipeline.from_pretrained(path, controlnet=controlnet, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref(PROMPT, guidance_scale=3.5, num_inference_steps=3, generator=torch.Generator().manual_seed(7), width=32,
               height=32, max_sequence_length=model.model.max_sequence_length, output_type="np", **call).images[0]


def modes_passed(monkeypatch, run) -> list[list[int]]:
    """The ``controlnet_mode`` rows each ControlNet call of ``run()`` got (None for none)."""
    from diffusers import FluxControlNetModel

    seen: list = []
    forward = FluxControlNetModel.forward

    def spy(self, *args, **kwargs):
        mode = kwargs.get("controlnet_mode")
        seen.append(None if mode is None else mode.reshape(-1).tolist())
        return forward(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(FluxControlNetModel, "forward", spy)
        run()
    return seen


@pytest.mark.parametrize(("given", "index", "name"), [("depth", 2, "depth"), (4, 4, "pose"), ("Low Quality", 6, "lq")])
def test_union_controlnet_matches_diffusers_flux_controlnet_pipeline_with_control_mode(  # noqa: F811
        dev, flux_paths, union_controlnets, mean_vae_posterior, monkeypatch, given, index, name):  # noqa: F811
    from diffusers import FluxControlNetModel

    results = []
    adapters = (unit(union_controlnets["union"], weight=0.8, union_control_type=given),)
    modes = modes_passed(monkeypatch, lambda: results.append(dev.txt2img(PROMPT, adapters=adapters, **KW)))
    assert modes == [[index]] * 3  # one row (batch 1, no CFG) per step
    expected = diffusers_flux(dev, flux_paths["dev"], FluxControlNetModel.from_pretrained(union_controlnets["union"]),
                              control_image=noise_picture(32, seed=5), controlnet_conditioning_scale=0.8,
                              control_mode=index)
    ours = as_array(results[0].image)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert np.abs(ours - as_array(dev.txt2img(PROMPT, **KW).image)).mean() > 0.01  # the control changed the picture
    assert results[0].parameters.count(f"Union Control Type: {name}") == 1


def test_two_union_units_with_different_modes_match_diffusers_multi_controlnet(  # noqa: F811
        dev, flux_paths, union_controlnets, mean_vae_posterior, monkeypatch):  # noqa: F811
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel

    units = (unit(union_controlnets["union"], seed=5, weight=0.8, union_control_type="canny"),
             unit(union_controlnets["union"], seed=6, weight=0.5, union_control_type="4"))
    results = []
    modes = modes_passed(monkeypatch, lambda: results.append(dev.txt2img(PROMPT, adapters=units, **KW)))
    assert modes == [[0], [4]] * 3
    multi = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(union_controlnets["union"])])
    expected = diffusers_flux(dev, flux_paths["dev"], multi, control_image=[noise_picture(32, seed=5), noise_picture(32, seed=6)],
                              controlnet_conditioning_scale=[0.8, 0.5], control_mode=[0, 4],
                              # per image: with one net, diffusers' default window list has one item and runs one image
                              control_guidance_start=[0.0, 0.0], control_guidance_end=[1.0, 1.0])
    assert np.abs(as_array(results[0].image) - quantised(expected)).mean() < 1e-3
    assert "Union Control Type: canny" in results[0].parameters and "Union Control Type: pose" in results[0].parameters


def test_control_types_are_required_for_union_controlnets_and_refused_elsewhere(dev, union_controlnets, tiny_pipe):  # noqa: F811
    kw = dict(steps=1, seed=1, width=32, height=32)
    with pytest.raises(InvalidParameter, match="union_control_type.*required for a union ControlNet"):
        dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"]),), **kw)
    with pytest.raises(InvalidParameter, match="union_control_type.*required"):  # sd-webui-controlnet's "no type"
        dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"], union_control_type="Unknown"),), **kw)
    with pytest.raises(InvalidParameter, match="must be one of canny, tile, depth, blur, pose, gray, lq"):
        dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"], union_control_type="segmentation"),), **kw)
    with pytest.raises(InvalidParameter, match="index from 0 to 6"):
        dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"], union_control_type=7),), **kw)
    with pytest.raises(InvalidParameter, match="union ControlNets only.*one control type"):
        dev.txt2img(PROMPT, adapters=(unit(union_controlnets["single"], union_control_type="canny"),), **kw)
    from diffusers import ControlNetModel

    unet_controlnet = ControlNetModel.from_unet(tiny_pipe.model.unet, conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(InvalidParameter, match="union ControlNets only; ControlNetModel"):
        tiny_pipe.txt2img(PROMPT, adapters=(unit(unet_controlnet, union_control_type="canny"),), **kw)
    # A ControlNet of one type writes sd-webui-controlnet's entry as before, with no control type.
    plain = dev.txt2img(PROMPT, adapters=(unit(union_controlnets["single"], union_control_type="Unknown"),), **kw)
    assert "ControlNet 0: " in plain.parameters and "Union Control Type" not in plain.parameters


def test_the_control_type_reads_back_from_png_parameters_and_from_the_a1111_api(dev, union_controlnets):  # noqa: F811
    from aipaint_plugins.controlnet.cli import parse_controlnet_option
    from aipaint_plugins.controlnet.units import units_from_params

    from aipaint.infotext import Infotext
    from aipaint.serve.a1111 import _controlnet_units

    kw = dict(steps=2, seed=3, width=32, height=32)
    first = dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"], union_control_type="tile"),), **kw)
    (recorded,) = units_from_params(Infotext.from_text(first.parameters).params)
    assert recorded["union_control_type"] == "tile"
    again = dev.txt2img(PROMPT, adapters=(unit(union_controlnets["union"], **{**recorded, "model": union_controlnets["union"]}),),
                        **kw)
    np.testing.assert_array_equal(as_array(again.image), as_array(first.image))
    units, _ = _controlnet_units({"controlnet": {"args": [{"model": "union", "union_control_type": "Tile"}]}})
    assert units[0].options["union_control_type"] == "Tile"
    assert parse_controlnet_option("union:edges.png:type=2")["union_control_type"] == 2.0  # the unit reads 2.0 as 2


# --- a control type for a ControlNet of one type ---------------------------------------------------


def test_a_control_type_is_refused_for_an_sd3_controlnet(tmp_path, plugin_host):
    from diffusers import StableDiffusion3Pipeline
    from test_sd3 import build_tiny_sd3_components, build_tiny_sd3_controlnet

    import aipaint

    StableDiffusion3Pipeline(**build_tiny_sd3_components(0)).save_pretrained(tmp_path / "sd3")
    build_tiny_sd3_controlnet(5).save_pretrained(tmp_path / "sd3-controlnet")
    pipe = aipaint.load(tmp_path / "sd3", host=plugin_host)
    with pytest.raises(InvalidParameter, match="union ControlNets only; SD3ControlNetModel"):
        pipe.txt2img(PROMPT, adapters=(unit(tmp_path / "sd3-controlnet", union_control_type="canny"),), steps=1,
                     width=32, height=32)
