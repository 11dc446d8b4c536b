"""Recipes on the embedded 32x32 model: each runs end to end and records its steps, the PNG's
recorded recipe re-runs to the same pixels, and bad input is a typed one-line error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from aipaint_plugins import recipes
from aipaint_plugins.recipes.cli import save_outputs
from aipaint_plugins.recipes.layout import subject_map, typeset_cover
from PIL import Image, ImageDraw

import aipaint
from aipaint import hookimpl
from aipaint.cli.main import main
from aipaint.errors import (
    AipaintWarning,
    ImageError,
    InvalidParameter,
    UnknownName,
    UnsupportedFeature,
)
from aipaint.infotext import Infotext, read_png_parameters
from aipaint.plugin.host import create_plugin_host

EMBEDDED = Path(__file__).resolve().parents[1] / "zoo" / "models" / "shapes-tiny"
pytestmark = pytest.mark.skipif(not (EMBEDDED / "unet").is_dir(), reason="the embedded model is not built")

FAST = {"seed": 3, "steps": 2}
SCENE = "a big red circle on the left, on a white background"


@pytest.fixture(scope="module")
def pipe():
    return aipaint.load()  # the embedded shapes-tiny model: 32x32, offline


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pipe) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    pipe.txt2img(SCENE, seed=1, steps=4).image.save(root / "picture.png")
    drawing = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(drawing).ellipse((6, 6, 26, 26), outline="black", width=2)
    drawing.save(root / "drawing.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((20, 0, 31, 31), fill=255)
    mask.save(root / "mask.png")
    grey = Image.open(root / "picture.png").convert("L").convert("RGB")
    grey.save(root / "grey.png")
    return {"picture": root / "picture.png", "drawing": root / "drawing.png", "mask": root / "mask.png",
            "grey": root / "grey.png"}


def settings_for(name: str, inputs: dict[str, Path]) -> dict:
    picture = str(inputs["picture"])
    return {
        "avatar": {"image": picture},
        "character": {"character": "a big red circle", "scenes": ["on the left, on a white background",
                                                                   "on the right, on a white background"]},
        "lineart": {"image": str(inputs["drawing"]), "prompt": "a big green circle, on a white background"},
        "stylize": {"image": picture, "prompt": "a big blue circle", "style": "watercolour"},
        "old-photo": {"image": str(inputs["grey"]), "colourise": True},
        "retouch": {"image": picture, "mask": str(inputs["mask"]), "prompt": "a blue square on the right"},
        "ad": {"description": "a yellow triangle", "audience": "children", "variants": 2},
        "variations": {"image": picture, "count": 2},
        "sticker": {"prompt": "a big red circle", "upscale": 2, "outline_width": 3},
        "cover": {"prompt": SCENE, "title": "Circles", "lines": ["issue one"], "upscale": 8},
        "qr": {"payload": "https://example.com/a", "prompt": "a red circle"},
    }[name]


# What each recipe's recorded steps must name, in order.
STEPS = {
    "avatar": ["crop square", "img2img", "facefix", "upscale"],
    "character": ["txt2img x2 scenes, one seed"],
    "lineart": ["fit to size", "lineart"],
    "stylize": ["img2img", "style=watercolour"],
    "old-photo": ["denoise", "colourise", "facefix", "upscale"],
    "retouch": ["inpaint"],
    "ad": ["brand(fresh", "txt2img x2", "contact sheet"],
    "variations": ["img2img variations x2"],
    "sticker": ["txt2img", "upscale", "sticker"],
    "cover": ["txt2img", "upscale", "typeset"],
    "qr": ["txt2img", "upscale", "qr"],
}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def params_of(text: str) -> dict[str, str]:
    return Infotext.from_text(text).params


def test_recipes_lists_every_recipe_with_one_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(STEPS)
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)  # each has its summary
    assert main(["recipes", "cover"]) == 0
    out = capsys.readouterr().out
    assert "title" in out and "band" in out and "'auto'" in out


@pytest.mark.parametrize("name", sorted(STEPS))
def test_each_recipe_runs_records_its_steps_and_reruns_to_the_same_pixels(name, pipe, inputs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AipaintWarning)  # character without a LoRA says so
        result = recipes.run_recipe(pipe, name, **settings_for(name, inputs), **FAST)
    assert result.images and len(result.images) == len(result.infotexts)
    for text in result.infotexts:
        params = params_of(text)
        assert params["Recipe"] == name
        recorded = json.loads(params["Recipe settings"])
        assert recorded["seed"] == 3 and recorded["steps"] == 2
        steps = params["Recipe steps"]
        positions = [steps.find(part) for part in STEPS[name]]
        assert -1 not in positions and positions == sorted(positions), steps
    written = save_outputs(result, tmp_path / f"{name}.png", sheet=len(result.images) > 1, title=name)
    assert all(path.is_file() for path in written)
    again = recipes.rerun(pipe, written[0])
    assert len(again.images) == len(result.images)
    for first, second in zip(result.images, again.images):
        assert first.mode == second.mode and np.array_equal(pixels(first), pixels(second))


def test_avatar_and_old_photo_upscale_by_default(pipe, inputs):
    avatar = recipes.avatar(pipe, image=str(inputs["picture"]), **FAST)
    assert avatar.image.size == (64, 64)  # the model's 32 px, upscaled twice
    assert params_of(avatar.parameters)["Postprocess upscale by"] == "2"


def test_old_photo_colourises_and_keeps_the_photo_tones(pipe, inputs):
    result = recipes.old_photo(pipe, image=str(inputs["grey"]), colourise=True, upscale=1, face_fix=False, **FAST)
    plain = recipes.old_photo(pipe, image=str(inputs["grey"]), colourise=False, upscale=1, face_fix=False, **FAST)
    hsv = cv2.cvtColor(np.asarray(result.image), cv2.COLOR_RGB2HSV)
    hsv_plain = cv2.cvtColor(np.asarray(plain.image), cv2.COLOR_RGB2HSV)
    assert hsv[..., 1].mean() > hsv_plain[..., 1].mean() + 5  # it has colour now; the grey photo had none
    luma = np.asarray(result.image.convert("YCbCr").getchannel("Y"), dtype=np.float32)
    luma_plain = np.asarray(plain.image.convert("YCbCr").getchannel("Y"), dtype=np.float32)
    assert np.abs(luma - luma_plain).mean() < 4  # light and shade are the photo's


def test_retouch_leaves_the_unmasked_part_alone(pipe, inputs):
    # The mask covers the picture's right third: the prompt puts its square there (the embedded model draws
    # an unplaced object in the centre, and keeps the white it is given); 4 steps, as 2 barely denoise.
    result = recipes.retouch(pipe, image=str(inputs["picture"]), mask=str(inputs["mask"]),
                             prompt="a big blue square on the right, on a white background", **{**FAST, "steps": 4})
    before, after = pixels(Image.open(inputs["picture"]).convert("RGB")), pixels(result.image)
    assert np.array_equal(before[:, :8], after[:, :8])  # outside the mask and its blur (sigma 4 reaches ~10 px)
    assert np.abs(before[:, 22:] - after[:, 22:]).mean() > 20  # the masked part was repainted (measured: 69.5)


def test_sticker_is_transparent_around_an_opaque_subject(pipe):
    result = recipes.sticker(pipe, prompt="a big red circle", upscale=2, outline_width=3, **FAST)
    alpha = np.asarray(result.image.getchannel("A"))
    assert result.image.mode == "RGBA" and alpha[0, 0] == 0 and alpha[alpha.shape[0] // 2, alpha.shape[1] // 2] == 255


def test_qr_art_decodes_to_its_payload(pipe):
    result = recipes.qr(pipe, payload="https://example.com/a", prompt="a red circle", **FAST)
    text, _, _ = cv2.QRCodeDetector().detectAndDecode(np.asarray(result.image.convert("RGB"))[:, :, ::-1])
    assert text == "https://example.com/a"


def test_ad_writes_the_brand_into_every_prompt_and_makes_a_contact_sheet(pipe, tmp_path):
    result = recipes.ad(pipe, description="a yellow triangle", audience="children", variants=3, **FAST)
    infos = [Infotext.from_text(text) for text in result.infotexts]
    assert len(infos) == 3 and len({info.prompt for info in infos}) == 3  # the shots vary
    assert all("for children" in i.prompt and "green and white and yellow colour palette" in i.prompt for i in infos)
    assert all("watermark" in i.negative_prompt for i in infos)
    assert [int(i.params["Seed"]) for i in infos] == [3, 4, 5]
    paths = save_outputs(result, tmp_path / "ad.png", sheet=True, title="ad")
    sheet = Image.open(paths[-1])
    assert paths[-1].name == "ad-sheet.png" and sheet.width > 3 * 32 and params_of(sheet.info["parameters"])["Recipe"] == "ad"


def test_cover_title_goes_where_the_subject_is_not():
    for where, expected in (((2, 8, 30, 56), "right"), ((8, 2, 56, 30), "bottom")):
        picture = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(picture).ellipse(where, fill=(220, 30, 30))
        typeset = typeset_cover(picture.resize((256, 256)), "Title", ["a line"])
        assert typeset.band == expected
        left, top, right, bottom = typeset.box
        subject = subject_map(picture.resize((256, 256)))[top:bottom, max(0, left):right]
        assert subject.mean() < 0.05  # the text's box holds no subject
        changed = np.abs(pixels(typeset.image) - pixels(picture.resize((256, 256)))).sum(axis=2) > 0
        outside = changed.copy()
        outside[top - 2:bottom + 2, max(0, left - 2):right + 2] = False
        assert changed.any() and not outside.any()  # ink only inside the text's box


def test_cover_uses_a_real_font(pipe):
    result = recipes.cover(pipe, prompt=SCENE, title="Circles", upscale=8, **FAST)
    font = params_of(result.parameters)["Cover font"]
    assert font.lower().endswith((".ttf", ".otf")) or font == "Pillow default"


def test_character_keeps_one_seed_and_applies_the_lora(pipe, tmp_path):
    import torch
    from aipaint_plugins.lora.formats import kohya_key
    from safetensors.torch import save_file

    name, module = next((n, m) for n, m in pipe.model.unet.named_modules() if n.endswith("attn2.to_v"))
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(module.out_features, 4, generator=g), torch.randn(4, module.in_features, generator=g)
    base = kohya_key("unet", name)
    save_file({f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(4.0)},
              str(tmp_path / "hero.safetensors"))
    scenes = ["on the left, on a white background", "on the right, on a white background"]
    with_lora = recipes.character(pipe, character="a big red circle", scenes=scenes, lora="hero", lora_dir=str(tmp_path),
                                  **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AipaintWarning)
        without = recipes.character(pipe, character="a big red circle", scenes=scenes, **FAST)
    infos = [Infotext.from_text(text) for text in with_lora.infotexts]
    assert all("<lora:hero:0.8>" in i.prompt and "hero" in i.params.get("Lora hashes", "") for i in infos)
    assert with_lora.seeds == [3, 3] and without.seeds == [3, 3]
    assert all(np.abs(pixels(a) - pixels(b)).mean() > 1 for a, b in zip(with_lora.images, without.images))


def test_character_from_a_reference_image_needs_a_reference_adapter(pipe, inputs):
    settings = {"character": "a big red circle", "scenes": ["on the left"], "reference": str(inputs["picture"]), **FAST}
    if "reference" in pipe.host.registry.adapters:  # the reference-image plugin is installed
        result = recipes.character(pipe, **settings)
        params = params_of(result.parameters)
        assert "reference via reference" in params["Recipe steps"] and "reference-only" in params["Reference 0"]
    else:
        with pytest.raises(UnsupportedFeature, match="lora=NAME"):
            recipes.character(pipe, **settings)
    with pytest.raises(UnsupportedFeature, match="'not-installed'.*lora=NAME"):
        recipes.character(pipe, **settings, reference_adapter="not-installed")


@pytest.mark.parametrize(("name", "settings", "error", "words"), [
    ("nope", {}, UnknownName, "'avatar'"),
    ("cover", {"prompt": "x", "title": "t", "colour_me": 1}, UnknownName, "'title'"),
    ("cover", {"prompt": "x", "title": "t", "steps": "many"}, InvalidParameter, "whole number"),
    ("stylize", {"image": "PICTURE", "prompt": "x", "denoising_strength": 2}, InvalidParameter, "from 0.01 to 1"),
    ("retouch", {"image": "PICTURE", "prompt": "x"}, InvalidParameter, "mask"),
    ("retouch", {"image": "PICTURE", "mask": "BLACK", "prompt": "x"}, InvalidParameter, "nothing to repaint"),
    ("retouch", {"image": "PICTURE", "mask": "SMALL", "prompt": "x"}, InvalidParameter, "the picture's size"),
    ("avatar", {}, InvalidParameter, "image"),
    ("avatar", {"image": "MISSING"}, InvalidParameter, "missing.png"),
    ("cover", {"prompt": "x", "title": 2026, "lines": "a;b", "band": "nowhere"}, InvalidParameter, "band"),
    ("cover", {"prompt": "x"}, InvalidParameter, "title"),
    ("qr", {"prompt": "x"}, InvalidParameter, "payload"),
    ("ad", {"description": "x", "brand": "unknown"}, UnknownName, "'fresh'"),
    ("ad", {"description": "x", "palette": ["#12"]}, InvalidParameter, "palette"),
    ("cover", {"prompt": "x", "title": "t", "band": "middle"}, InvalidParameter, "band"),
    ("variations", {"image": "PICTURE", "method": "image-prompt"}, UnsupportedFeature, "image prompts"),
    ("sticker", {"prompt": "x", "lines": ["a"]}, UnknownName, "outline_width"),
])
def test_bad_input_is_a_typed_error(pipe, inputs, tmp_path, name, settings, error, words):
    black = tmp_path / "black.png"
    Image.new("L", (32, 32), 0).save(black)
    small = tmp_path / "small.png"
    Image.new("L", (16, 16), 255).save(small)
    files = {"PICTURE": str(inputs["picture"]), "BLACK": str(black), "SMALL": str(small),
             "MISSING": str(tmp_path / "missing.png")}
    settings = {k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(error) as caught:
        recipes.run_recipe(pipe, name, **{**FAST, **settings})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_rerun_refuses_a_changed_input_and_a_png_without_a_recipe(pipe, inputs, tmp_path):
    picture = tmp_path / "mine.png"
    Image.open(inputs["picture"]).save(picture)
    result = recipes.stylize(pipe, image=str(picture), prompt="a blue circle", **FAST)
    out = result.save(tmp_path / "styled.png")
    Image.new("RGB", (32, 32), "white").save(picture)  # the input changed since
    with pytest.raises(ImageError, match="SHA-256"):
        recipes.rerun(pipe, out)
    moved = tmp_path / "moved.png"
    Image.open(inputs["picture"]).save(moved)
    again = recipes.rerun(pipe, out, inputs={"image": str(moved)})
    assert np.array_equal(pixels(again.image), pixels(result.image))
    plain = pipe.txt2img("x", **FAST).save(tmp_path / "plain.png")
    with pytest.raises(InvalidParameter, match="no 'Recipe'"):
        recipes.rerun(pipe, plain)


def test_cli_runs_a_recipe_and_reruns_it_from_its_png(pipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("aipaint.cli.api.load_pipeline", lambda args: pipe)
    out = tmp_path / "ad.png"
    assert main(["recipe", "ad", "description=a yellow triangle", "variants=2", "--seed", "3", "--steps", "2",
                 "-o", str(out)]) == 0
    written = capsys.readouterr().out.split()
    assert [Path(p).name for p in written] == ["ad-0.png", "ad-1.png", "ad-sheet.png"]
    assert main(["recipe", "-", "--from-png", str(tmp_path / "ad-1.png"), "-o", str(tmp_path / "again.png")]) == 0
    again = capsys.readouterr().out.split()
    assert np.array_equal(pixels(Image.open(again[1])), pixels(Image.open(tmp_path / "ad-1.png")))
    # A bad setting is one line, exit 2, before any model loads or file is written.
    monkeypatch.setattr("aipaint.cli.api.load_pipeline", lambda args: pytest.fail("loaded a model"))
    assert main(["recipe", "cover", "prompt=x", "title=t", "fraction=5", "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fraction" in err and "0.1 to 0.6" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c.png").exists()
    assert main(["recipe", "avatar", "--image", str(tmp_path / "nothere.png"), "-o", str(tmp_path / "a.png")]) == 2
    assert "nothere.png" in capsys.readouterr().err


def test_a_third_party_recipe_registers_like_the_built_ins(pipe, tmp_path):
    class ThirdParty:
        @hookimpl
        def register_recipes(self, register):
            def postcard(p, s):
                return p.txt2img(f"{s['prompt']}, postcard", seed=s["seed"], steps=s["steps"])

            register("postcard", postcard, summary="a postcard", defaults={"prompt": "", "seed": -1, "steps": 2})
            register("cover", postcard, summary="a second cover")  # taken: ignored with a warning

    host = create_plugin_host(extra_plugins=(ThirdParty(),))
    other = aipaint.Pipeline(pipe.model, host)
    with pytest.warns(AipaintWarning, match="recipe 'cover' from plugin .* plugin 'recipes' registered that name first"):
        result = recipes.run_recipe(other, "postcard", prompt="a red circle", seed=3)
    assert result.images and params_of(result.parameters)["Recipe"] == "postcard"
    assert recipes.recipe_book(host).get("cover").summary.startswith("prompt + title")  # the built-in kept its name
    assert Infotext.from_text(result.parameters).prompt == "a red circle, postcard"
    assert read_png_parameters(result.save(tmp_path / "p.png"))
