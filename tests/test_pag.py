"""Perturbed-attention guidance: parity with diffusers' StableDiffusionPAGPipeline on a tiny random
model, the loop seam it uses, the processors restored, the PNG entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aipaint.errors import InvalidParameter

GEN = dict(seed=11, steps=4, width=32, height=32)


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])


@pytest.fixture(scope="module")
def reference(tiny_sd_path):
    from diffusers import StableDiffusionPAGPipeline

    def make(layers: list[str]):
        ref = StableDiffusionPAGPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False,
                                                         pag_applied_layers=layers)
        ref.set_progress_bar_config(disable=True)
        return ref

    return make


@pytest.mark.parametrize(("cfg", "pag", "layers"), [(7.0, 3.0, "mid"), (1.0, 3.0, "mid"), (5.0, 2.0, "down_blocks.1")],
                         ids=["cfg7-pag3-mid", "no-cfg-pag3-mid", "cfg5-pag2-down1"])
def test_matches_diffusers_pag_pipeline(tiny_pipe, reference, cfg, pag, layers):
    ours = tiny_pipe.txt2img("a red circle", "blue", cfg_scale=cfg, batch_size=2, **GEN,
                             options={"pag": {"scale": pag, "layers": layers}})
    plain = tiny_pipe.txt2img("a red circle", "blue", cfg_scale=cfg, batch_size=2, **GEN)
    ref = reference(layers.split(","))
    generators = [torch.Generator().manual_seed(s) for s in (11, 12)]
    theirs = ref("a red circle", negative_prompt="blue" if cfg > 1 else None, num_inference_steps=4, guidance_scale=cfg,
                 pag_scale=pag, generator=generators, height=32, width=32, num_images_per_prompt=2,
                 output_type="pil").images
    gap = np.abs(as_array(ours.images) - as_array(theirs)).mean()
    effect = np.abs(as_array(ours.images) - as_array(plain.images)).mean()
    assert gap < 1e-3
    assert effect > 20 * max(gap, 1e-4), f"PAG changed the picture by only {effect:.2e}: the parity cannot tell"


def test_the_perturbed_rows_get_identity_attention_and_the_rest_are_untouched():
    from aipaint_plugins.guidance.pag import _Rows, identity_attention, perturbed_layers
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8).eval()
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    before = attn.processor
    x = torch.randn(3, 16, 64)
    with torch.no_grad(), perturbed_layers(unet, ["mid"]) as rows:
        assert isinstance(rows, _Rows) and attn.processor is not before
        assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.processor.__class__ is before.__class__
        rows.first = 2
        out = attn(x)
        rows.first = None
        plain = attn(x)
    assert attn.processor is before
    with torch.no_grad():
        torch.testing.assert_close(out[:2], before(attn, x[:2]))
        torch.testing.assert_close(out[2:], attn.to_out[0](attn.to_v(x[2:])))
        torch.testing.assert_close(plain, before(attn, x))
        torch.testing.assert_close(identity_attention(attn, x), attn.to_out[0](attn.to_v(x)))
        assert not torch.allclose(out[2:], before(attn, x[2:]), atol=1e-3)


def test_processors_are_restored_after_a_job_and_after_an_error(tiny_pipe):
    unet = tiny_pipe.model.unet
    before = dict(unet.attn_processors)
    tiny_pipe.txt2img("a red circle", cfg_scale=4, **GEN, options={"pag": {}})
    assert unet.attn_processors == before
    with pytest.raises(InvalidParameter, match="pag.layers"):
        tiny_pipe.txt2img("a red circle", **GEN, options={"pag": {"layers": "mid,no_such_block"}})
    assert unet.attn_processors == before


def test_scale_zero_is_plain_guidance_and_the_pag_term_is_linear(tiny_pipe):
    plain = tiny_pipe.txt2img("a red circle", "blue", cfg_scale=5, **GEN)
    zero = tiny_pipe.txt2img("a red circle", "blue", cfg_scale=5, **GEN, options={"pag": {"scale": 0}})
    assert np.abs(as_array(zero.images) - as_array(plain.images)).max() <= 1 / 255


def test_with_and_ed_prompts_each_part_gets_its_perturbed_copy(tiny_pipe):
    one = tiny_pipe.txt2img("a red circle AND a blue square", cfg_scale=5, **GEN, options={"pag": {"scale": 2}})
    off = tiny_pipe.txt2img("a red circle AND a blue square", cfg_scale=5, **GEN)
    assert np.abs(as_array(one.images) - as_array(off.images)).mean() > 1e-3


def test_the_loop_hands_the_perturbed_rows_to_the_contributor(tiny_pipe):
    """The seam's row layout: the perturbed copy starts after [negative, positive] × batch."""
    from aipaint.engine.loop import LoopContributor

    seen = []

    class Spy(LoopContributor):
        def perturbed_pass(self, step, guided, first_row):
            seen.append((guided, first_row))
            return True

        def perturbed_guidance(self, step, total, *, x, t, output, positive, perturbed):
            seen.append(torch.equal(positive, perturbed))  # nothing perturbed them: the same rows, the same output
            return output

    import aipaint.engine.run as run

    original = run.denoise

    def spied(job, *args, **kwargs):
        job.contributors = [*job.contributors, Spy()]
        return original(job, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(run, "denoise", spied)
    try:
        tiny_pipe.txt2img("a red circle", "blue", cfg_scale=5, batch_size=2, **GEN)
    finally:
        mp.undo()
    assert (True, 4) in seen
    assert all(s is True for s in seen if isinstance(s, bool))


@pytest.mark.parametrize(("options", "message"), [
    ({"scale": -1}, "pag.scale"), ({"adaptive_scale": 2}, "pag.adaptive_scale"), ({"layers": " , "}, "pag.layers"),
    ({"layers": "mid(("}, "pag.layers"),
])
def test_bad_options_are_refused(tiny_pipe, options, message):
    with pytest.raises(InvalidParameter, match=message.replace(".", r"\.")):
        tiny_pipe.txt2img("a red circle", **GEN, options={"pag": options})


def test_recorded_with_forge_names_and_regenerated_from_the_png(tiny_sd_path, tmp_path):
    from PIL import Image

    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert cli_main(["generate", "a red circle", "--option", "pag.scale=2.5", "--option", "pag.layers=mid,down_blocks.1",
                     "--cfg-scale", "4", "--steps", "4", "-W", "32", "-H", "32", "--seed", "1", "-o", str(first),
                     *common]) == 0
    text = read_png_parameters(first)
    assert "PerturbedAttentionGuidance_scale: 2.5" in text and "PerturbedAttentionGuidance_enabled: True" in text
    assert '"mid,down_blocks.1"' in text or "PAG layers: mid,down_blocks.1" in text
    assert cli_main(["generate", "--from-png", str(first), "-o", str(again), *common]) == 0
    assert "PerturbedAttentionGuidance_scale: 2.5" in read_png_parameters(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_sdxl_matches_diffusers_sdxl_pag_pipeline(tmp_path, plugin_host):
    """PAG through the SDXL family (its added conditioning rows travel with the perturbed copy)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPAGPipeline, StableDiffusionXLPipeline
    from test_sdxl import build_tiny_sdxl_components

    import aipaint

    StableDiffusionXLPipeline(**build_tiny_sdxl_components(0)).save_pretrained(tmp_path / "base")
    ours = aipaint.load(tmp_path / "base", host=plugin_host).txt2img(
        "a big red circle", "blue", sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=32, height=32,
        options={"pag": {"scale": 3.0, "layers": "mid"}})
    ref = StableDiffusionXLPAGPipeline.from_pretrained(tmp_path / "base", local_files_only=True,
                                                       pag_applied_layers=["mid"])
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a big red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=5.0, pag_scale=3.0,
                 generator=torch.Generator().manual_seed(7), width=32, height=32, output_type="pil").images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3
