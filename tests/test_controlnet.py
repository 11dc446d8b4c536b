"""ControlNet: plumbing on a tiny random ControlNet built from the tiny UNet, and behaviour
on the embedded model with its trained layout ControlNet (skipped when that is missing)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aipaint.errors import ImageError, InvalidParameter, ModelLoadError, UnknownName, UnsafeFileError
from aipaint.plugin.adapters import AdapterUnit

KW = dict(width=32, height=32, steps=3, seed=7, cfg_scale=5.0)


def _control_image() -> Image.Image:
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    return render(Scene("white", (SceneObject("square", "red", "big", "left", 8.0, 16.0, 13.0),)))


def _tiny_controlnet(unet, seed: int, cond_channels=(8, 16)):
    """A ControlNet copied from the tiny UNet, with its zero-initialised output convs
    randomised so that it changes the image (a freshly made one adds exact zeros)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
    with torch.no_grad():
        for module in (controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out):
            for p in module.parameters():
                p.normal_(0.0, 0.3)
    return controlnet.eval()


@pytest.fixture(scope="module")
def cn_folder(tmp_path_factory, tiny_pipe) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("controlnet")
    _tiny_controlnet(tiny_pipe.model.unet, 1).save_pretrained(folder / "tiny-cn")
    _tiny_controlnet(tiny_pipe.model.unet, 2).save_pretrained(folder / "styles" / "Other-CN")
    # the same weights as tiny-cn, as one diffusers-layout file
    state = _tiny_controlnet(tiny_pipe.model.unet, 1).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "tiny-cn-file.safetensors"))
    # made for a model with a 4x VAE: must be refused on the tiny (2x) model
    _tiny_controlnet(tiny_pipe.model.unet, 3, cond_channels=(8, 16, 32)).save_pretrained(folder / "wrong-factor")
    return folder


@pytest.fixture(autouse=True)
def _controlnet_dir(cn_folder, monkeypatch):
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(cn_folder))


def unit(**options) -> AdapterUnit:
    return AdapterUnit("controlnet", {"model": "tiny-cn", "image": _control_image(), **options})


def latents(pipe, *units, prompt="a red square", **kw):
    """The loop's final latents (more precise than 8-bit images for equality checks)."""
    from engine_support import record_job

    from aipaint.api.request import GenerationRequest

    request = GenerationRequest(prompt=prompt, adapters=tuple(units), **{**KW, **kw})
    with record_job() as job:
        result = pipe.generate(request)
    return result.latents, job.contributors, job.infotext


# --------------------------------------------------------------------------- plumbing
def test_controlnet_changes_the_result(tiny_pipe):
    plain, _, _ = latents(tiny_pipe)
    controlled, contributors, _ = latents(tiny_pipe, unit())
    assert (plain - controlled).abs().max() > 1e-2
    assert contributors[0].calls == KW["steps"]


def test_matches_diffusers_controlnet_pipeline(tiny_pipe, cn_folder):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from aipaint.engine.plans import _make_scheduler

    model = tiny_pipe.model
    controlnet = ControlNetModel.from_pretrained(cn_folder / "tiny-cn")
    ref = StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        controlnet=controlnet, scheduler=_make_scheduler("DPMSolverMultistepScheduler", model.scheduler_config, {}, [7]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    image = _control_image()
    theirs = ref("a red square", image=image, num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(7), controlnet_conditioning_scale=0.7, output_type="np").images
    ours = tiny_pipe.txt2img("a red square", adapters=(unit(weight=0.7),), **KW).image
    assert np.abs(np.asarray(ours, np.float32) / 255 - theirs[0]).mean() < 2e-3


def test_weight_zero_is_no_controlnet(tiny_pipe):
    plain = tiny_pipe.txt2img("a red square", **KW).image
    zero = tiny_pipe.txt2img("a red square", adapters=(unit(weight=0.0),), **KW).image
    assert np.array_equal(np.asarray(plain), np.asarray(zero))


def test_outside_the_guidance_window_has_no_effect(tiny_pipe):
    plain, _, _ = latents(tiny_pipe)
    # steps are at fractions 0, 1/3, 2/3: a window starting at 0.9 covers none of them
    late, contributors, _ = latents(tiny_pipe, unit(guidance_start=0.9, guidance_end=1.0))
    assert contributors[0].calls == 0
    assert torch.equal(plain, late)
    early, contributors, _ = latents(tiny_pipe, unit(guidance_start=0.0, guidance_end=0.4))
    assert contributors[0].calls == 2  # fractions 0 and 1/3
    full, _, _ = latents(tiny_pipe, unit())
    assert (early - plain).abs().max() > 1e-3 and (early - full).abs().max() > 1e-3


def test_two_units_sum(tiny_pipe):
    whole, _, _ = latents(tiny_pipe, unit(weight=1.0))
    halves, contributors, info = latents(tiny_pipe, unit(weight=0.5), unit(weight=0.5))
    assert len(contributors) == 2 and set(info) == {"ControlNet 0", "ControlNet 1"}
    assert torch.allclose(whole, halves, atol=1e-4)
    other, _, _ = latents(tiny_pipe, unit(weight=0.5), unit(model="Other-CN", weight=0.5))
    assert (other - whole).abs().max() > 1e-3


def test_residuals_of_two_contributors_are_added(tiny_pipe):
    from aipaint.engine.loop import _merge_kwargs

    _, contributors, _ = latents(tiny_pipe, unit(weight=0.3), unit(model="Other-CN", weight=1.2), steps=1)
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500, 500])
    embeds = torch.randn(2, 77, 32)
    parts = [c.unet_kwargs(0, x, t, embeds) for c in contributors]
    merged = _merge_kwargs(parts)
    for i, residual in enumerate(merged["down_block_additional_residuals"]):
        expected = parts[0]["down_block_additional_residuals"][i] + parts[1]["down_block_additional_residuals"][i]
        assert torch.allclose(residual, expected)


def test_batch_items_get_their_own_control_image(tiny_pipe):
    blank = Image.new("RGB", (32, 32), "black")
    square = _control_image()
    batch, _, _ = latents(tiny_pipe, unit(image=[blank, square]), batch_size=2)
    second, _, _ = latents(tiny_pipe, unit(image=square), seed=KW["seed"] + 1)
    first, _, _ = latents(tiny_pipe, unit(image=blank))
    assert torch.allclose(batch[1:], second, atol=1e-4)
    assert torch.allclose(batch[:1], first, atol=1e-4)
    with pytest.raises(InvalidParameter, match="one per batch item"):
        latents(tiny_pipe, unit(image=[blank, square, blank]), batch_size=2)


def test_controlnet_is_more_important_leaves_unconditional_rows_alone(tiny_pipe):
    _, contributors, info = latents(tiny_pipe, unit(control_mode="ControlNet is more important"), steps=1)
    assert "Control Mode: ControlNet is more important" in info["ControlNet 0"]
    x = torch.randn(2, 4, 16, 16)  # [negative, positive] for a batch of one
    out = contributors[0].unet_kwargs(0, x, torch.tensor([500, 500]), torch.randn(2, 77, 32))
    for residual in [*out["down_block_additional_residuals"], out["mid_block_additional_residual"]]:
        assert residual[0].abs().max() == 0 and residual[1].abs().max() > 0


def test_controlnet_is_more_important_with_skip_early_cfg(tiny_pipe):
    """An unguided early call has no negative rows: the control reaches its only row."""
    mode = unit(control_mode="ControlNet is more important")
    _, contributors, _ = latents(tiny_pipe, mode, steps=4, skip_early_cfg=0.5)
    cn = contributors[0]
    cn.before_call(0, False)
    out = cn.unet_kwargs(0, torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32))
    assert out["mid_block_additional_residual"].shape[0] == 1 and out["mid_block_additional_residual"].abs().max() > 0
    cn.before_call(3, True)
    out = cn.unet_kwargs(3, torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 77, 32))
    assert out["mid_block_additional_residual"][0].abs().max() == 0
    with_skip, _, _ = latents(tiny_pipe, mode, steps=4, skip_early_cfg=0.5)
    without, _, _ = latents(tiny_pipe, mode, steps=4)
    assert torch.isfinite(with_skip).all() and not torch.equal(with_skip, without)


def test_single_file_in_diffusers_layout_equals_the_folder(tiny_pipe):
    folder, _, _ = latents(tiny_pipe, unit(model="tiny-cn"))
    single, _, info = latents(tiny_pipe, unit(model="tiny-cn-file"))
    assert torch.allclose(folder, single, atol=1e-5)
    assert "Model: tiny-cn-file [" in info["ControlNet 0"]


def test_names_are_found_case_insensitively_in_subfolders(tiny_pipe):
    from aipaint_plugins.controlnet import models

    assert models.resolve("other-cn").path.name == "Other-CN"
    assert models.resolve("styles/Other-CN").path.name == "Other-CN"


@pytest.mark.parametrize("name", ["../tiny-cn", "/etc/passwd", "styles/../../x", "~/x", "C:\\x", "a//b"])
def test_names_never_escape_the_folder(tiny_pipe, name):
    from aipaint_plugins.controlnet.models import NameOutsideFolder

    with pytest.raises(NameOutsideFolder):
        tiny_pipe.txt2img("x", adapters=(unit(model=name),), **KW)


def test_a_link_out_of_the_folder_is_refused(tiny_pipe, cn_folder, tmp_path):
    from aipaint_plugins.controlnet.models import NameOutsideFolder

    outside = tmp_path / "outside-cn"
    shutil.copytree(cn_folder / "tiny-cn", outside)
    link = cn_folder / "sneaky"
    os.symlink(outside, link)
    try:
        with pytest.raises(NameOutsideFolder, match="leads out"):
            tiny_pipe.txt2img("x", adapters=(unit(model="sneaky"),), **KW)
    finally:
        link.unlink()


def test_missing_model_is_a_typed_error_listing_what_exists(tiny_pipe):
    from aipaint_plugins.controlnet.models import ControlNetNotFound

    with pytest.raises(ControlNetNotFound) as info:
        tiny_pipe.txt2img("x", adapters=(unit(model="no-such-controlnet"),), **KW)
    assert isinstance(info.value, UnknownName)
    assert "tiny-cn" in info.value.valid and "AIPAINT_CONTROLNET_DIR" in str(info.value)


def test_pickles_are_refused_unless_allowed(tiny_pipe, cn_folder):
    pickle = cn_folder / "pickled.pth"
    pickle.write_bytes(b"not really a pickle")
    try:
        with pytest.raises(UnsafeFileError, match="allow_pickle"):
            tiny_pipe.txt2img("x", adapters=(unit(model="pickled"),), **KW)
    finally:
        pickle.unlink()


def test_controlnet_for_another_base_model_is_refused(tiny_pipe):
    with pytest.raises(ModelLoadError, match="another base model"):
        tiny_pipe.txt2img("x", adapters=(unit(model="wrong-factor"),), **KW)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"weight": 3}, InvalidParameter),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, InvalidParameter),
        ({"control_mode": "louder"}, InvalidParameter),
        ({"resize_mode": "squash"}, InvalidParameter),
        ({"wieght": 1.0}, InvalidParameter),
        ({"preprocessor": "cany"}, UnknownName),
        ({"image": None}, InvalidParameter),
        ({"image": "/no/such/image.png"}, ImageError),
        ({"preprocessor": "canny", "low_threshold": 900}, InvalidParameter),
    ],
)
def test_bad_unit_options_are_typed_errors(tiny_pipe, options, error):
    with pytest.raises(error):
        tiny_pipe.txt2img("x", adapters=(unit(**options),), **KW)


def test_infotext_records_each_unit_as_a1111_does(tiny_pipe):
    from aipaint_plugins.controlnet.units import units_from_params

    from aipaint.infotext import Infotext

    result = tiny_pipe.txt2img("a red square", adapters=(
        unit(preprocessor="canny", weight=0.8, low_threshold=50, guidance_end=0.5),
        unit(model="Other-CN", control_mode="My prompt is more important", resize_mode="Just Resize"),
    ), **KW)
    params = Infotext.from_text(result.parameters).params
    first = params["ControlNet 0"]
    assert first.startswith("Module: canny, Model: tiny-cn [")
    assert ", Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 32, Threshold A: 50.0, Threshold B: 200.0, " in first
    assert first.endswith("Guidance Start: 0.0, Guidance End: 0.5, Pixel Perfect: True, Control Mode: Balanced")
    recorded = units_from_params(params)
    assert [u["model"].split(" [")[0] for u in recorded] == ["tiny-cn", "Other-CN"]
    assert recorded[0]["threshold_a"] == 50.0 and recorded[0]["guidance_end"] == 0.5
    assert recorded[1]["control_mode"] == "My prompt is more important" and recorded[1]["resize_mode"] == "Just Resize"


def test_png_from_another_file_of_the_same_name_is_refused(tiny_pipe):
    with pytest.raises(ModelLoadError, match="different file"):
        tiny_pipe.txt2img("x", adapters=(unit(model="tiny-cn [0123abcd]"),), **KW)


def test_cli_generates_with_controlnet_and_from_png_reproduces_it(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    control = tmp_path / "control.png"
    _control_image().save(control)
    first = tmp_path / "first.png"
    common = ["-m", str(tiny_sd_path), "--no-progress"]
    assert main(["generate", "a red square", "--steps", "3", "-W", "32", "-H", "32", "--seed", "5",
                 "--controlnet", f"tiny-cn:{control}:canny:0.9:end=0.7:low_threshold=60", "-o", str(first), *common]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--control-image", str(control), "-o", str(again), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red square", "--steps", "3", "-W", "32", "-H", "32", "--seed", "5", "-o", str(plain), *common]) == 0
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(plain)))
    capsys.readouterr()
    assert main(["generate", "--from-png", str(first), "-o", str(tmp_path / "x.png"), *common]) == 2
    assert "--control-image" in capsys.readouterr().err


def test_units_from_png_for_python_callers(tiny_pipe, tmp_path):
    from aipaint_plugins.controlnet import units_from_png

    from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters

    result = tiny_pipe.txt2img("a red square", adapters=(unit(weight=0.6, guidance_start=0.3),), **KW)
    path = result.save(tmp_path / "cn.png")
    kwargs = generation_kwargs(Infotext.from_text(read_png_parameters(path)))
    again = tiny_pipe.txt2img(**kwargs, adapters=units_from_png(path, [_control_image()]))
    assert np.array_equal(np.asarray(result.image), np.asarray(again.image))


def _has(mode: str) -> bool:
    from aipaint.pipeline import Pipeline

    return hasattr(Pipeline, mode)


@pytest.mark.skipif(not _has("img2img"), reason="Pipeline.img2img is not implemented yet")
def test_works_in_img2img(tiny_pipe):
    init = Image.new("RGB", (32, 32), (40, 90, 200))
    plain = tiny_pipe.img2img(init, "a red square", denoising_strength=0.8, **KW).image
    controlled = tiny_pipe.img2img(init, "a red square", denoising_strength=0.8, adapters=(unit(),), **KW)
    assert "ControlNet 0" in controlled.parameters
    assert np.abs(np.asarray(plain, np.float32) - np.asarray(controlled.image, np.float32)).mean() > 0.5


@pytest.mark.skipif(not _has("inpaint"), reason="Pipeline.inpaint is not implemented yet")
def test_works_in_inpaint(tiny_pipe):
    init = Image.new("RGB", (32, 32), (40, 90, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    plain = tiny_pipe.inpaint(init, mask, "a red square", **KW).image
    controlled = tiny_pipe.inpaint(init, mask, "a red square", adapters=(unit(),), **KW)
    assert "ControlNet 0" in controlled.parameters
    diff = np.abs(np.asarray(plain, np.float32) - np.asarray(controlled.image, np.float32)).mean(axis=2)
    assert diff[:, :12].mean() > 0.5


def _lora_available() -> bool:
    from aipaint.plugin.host import create_plugin_host

    return "lora" in create_plugin_host().registry.adapters and _has("inpaint")


@pytest.mark.skipif(not _lora_available(), reason="needs the LoRA plugin and Pipeline.inpaint")
def test_lora_controlnet_inpainting_and_prompt_editing_in_one_call(tiny_sd_path, tmp_path, monkeypatch, capsys):
    """All four together through the CLI, every adapter recorded, and --from-png reproduces it."""
    from aipaint_plugins.lora.formats import kohya_key
    from safetensors.torch import save_file

    from aipaint.cli.main import main

    loras = tmp_path / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(0)
    base = kohya_key("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    save_file({f"{base}.lora_up.weight": torch.randn(64, 4, generator=g), f"{base}.lora_down.weight": torch.randn(4, 64, generator=g),
               f"{base}.alpha": torch.tensor(4.0)}, str(loras / "style.safetensors"))
    monkeypatch.setenv("AIPAINT_LORA_DIR", str(loras))
    init, mask, control = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "control.png"
    Image.new("RGB", (32, 32), (40, 90, 200)).save(init)
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 20, 32))
    m.save(mask)
    _control_image().save(control)
    common = ["-m", str(tiny_sd_path), "--no-progress", "--steps", "4", "-W", "32", "-H", "32", "--seed", "3"]
    prompt = "a [red:blue:0.5] square <lora:style:0.8>"
    outputs = {}
    for name, extra in {"all": ["--controlnet", f"tiny-cn:{control}:canny:0.9"], "no-cn": []}.items():
        outputs[name] = tmp_path / f"{name}.png"
        assert main(["inpaint", str(init), str(mask), prompt, *extra, "-o", str(outputs[name]), *common]) == 0
    no_lora = tmp_path / "no-lora.png"
    assert main(["inpaint", str(init), str(mask), "a [red:blue:0.5] square", "--controlnet", f"tiny-cn:{control}:canny:0.9",
                 "-o", str(no_lora), *common]) == 0
    params = read_parameters(outputs["all"])
    assert "Lora hashes" in params and "ControlNet 0" in params and "Denoising strength" in params
    assert "[red:blue:0.5]" in Image.open(outputs["all"]).info["parameters"]
    pixels = {k: np.asarray(Image.open(v), np.int16) for k, v in {**outputs, "no-lora": no_lora}.items()}
    assert np.abs(pixels["all"] - pixels["no-cn"]).max() > 0 and np.abs(pixels["all"] - pixels["no-lora"]).max() > 0
    again = tmp_path / "again.png"
    assert main(["inpaint", str(init), str(mask), "--from-png", str(outputs["all"]), "--control-image", str(control),
                 "-o", str(again), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert np.array_equal(pixels["all"], np.asarray(Image.open(again), np.int16))


def read_parameters(path: Path) -> dict[str, str]:
    from aipaint.infotext import Infotext, read_png_parameters

    return Infotext.from_text(read_png_parameters(path)).params


# --------------------------------------------------------------------------- behaviour
def _embedded_models():
    from aipaint.models import zoo

    try:
        base = zoo.fetch(zoo.get("shapes-tiny"))
        zoo.fetch(zoo.get("shapes-tiny-controlnet-layout"))
    except Exception as exc:  # missing card or weights
        return f"embedded model or its layout ControlNet is missing ({exc})"
    if not (base / "unet").is_dir():
        return "the embedded model shapes-tiny has not been trained yet"
    return None


@pytest.mark.skipif(_embedded_models() is not None, reason=str(_embedded_models()))
def test_objects_appear_where_the_control_image_puts_them(plugin_host):
    """On the embedded model, the layout ControlNet decides where the object goes: ≥ 90% of
    20 placements right (prompt without a position), against about chance without it."""
    from aipaint_plugins.shapes_world.controlnet_layout import layout_cases, position_accuracy

    import aipaint

    pipe = aipaint.load(host=plugin_host)
    cases = layout_cases(20, seed=123)
    with_cn = position_accuracy(pipe, cases, use_controlnet=True, steps=10)
    without = position_accuracy(pipe, cases, use_controlnet=False, steps=10)
    assert with_cn >= 0.9, (with_cn, without)
    assert without <= 0.6, (with_cn, without)


def test_controlnet_option_parsing(tmp_path):
    from aipaint_plugins.controlnet.cli import parse_controlnet_option

    from aipaint.errors import AipaintError

    assert parse_controlnet_option("cn:img.png") == {"model": "cn", "image": "img.png"}
    assert parse_controlnet_option("cn:img.png:canny:0.5:end=0.6:mode=control:low_threshold=20") == {
        "model": "cn", "image": "img.png", "preprocessor": "canny", "weight": 0.5, "guidance_end": 0.6,
        "control_mode": "control", "low_threshold": 20.0,
    }
    weights = tmp_path / "my-cn.safetensors"
    weights.write_bytes(b"")
    assert parse_controlnet_option(f"{weights}:img.png")["model"] == weights  # an existing path stays a path
    for bad in ("cn", ":img.png", "cn:img.png:canny:heavy", "cn:img.png:canny:1:extra"):
        with pytest.raises(AipaintError):
            parse_controlnet_option(bad)


def test_the_layout_controlnets_training_maps_are_canny_edges_of_the_render():
    """The layout ControlNet is trained on the ``canny`` preprocessor's maps of renders: white edges
    on black, around each object and nowhere else."""
    from aipaint_plugins.shapes_world.controlnet_layout import layout_map
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(5)
    for _ in range(6):
        scene = random_scene(rng, "train")
        edges = np.asarray(layout_map(scene))
        assert edges.shape == (32, 32, 3) and set(np.unique(edges)) <= {0, 255} and edges.any()
        picture = np.asarray(render(scene).convert("RGB"), dtype=np.int16)
        changes = np.zeros((32, 32), bool)  # pixels next to a colour change
        changes[:, 1:] |= np.abs(np.diff(picture, axis=1)).sum(2) > 0
        changes[:, :-1] |= np.abs(np.diff(picture, axis=1)).sum(2) > 0
        changes[1:] |= np.abs(np.diff(picture, axis=0)).sum(2) > 0
        changes[:-1] |= np.abs(np.diff(picture, axis=0)).sum(2) > 0
        assert changes[edges[:, :, 0] > 0].all()  # every edge pixel is on an object's outline
