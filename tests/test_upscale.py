"""Upscalers, tiled processing, hires fix and SD upscale (plugins/upscale)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.upscale.tiling import check_tiling, process_tiled, tile_starts
from aipaint_plugins.upscale.upscalers import UpscaleSettings, get_upscaler, upscaler_catalogue
from PIL import Image

from aipaint.engine.postprocessing import run_postprocessors
from aipaint.errors import (
    ImageError,
    InvalidParameter,
    ModelLoadError,
    UnknownName,
    UnsafeFileError,
    UnsupportedFeature,
)
from aipaint.infotext import Infotext
from aipaint.plugin.kit.folders import NameOutsideFolder
from aipaint.plugin.kit.image_models import load_image_model, pil_to_tensor, resolve_weights, weight_files
from aipaint.plugin.postprocess import PostStep, merge_infotext

SHAPES_MODEL = Path(__file__).resolve().parent.parent / "zoo" / "models" / "shapes-tiny"


def _compact(scale: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Real-ESRGAN "Compact" network (random weights) as spandrel sees it."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(seed)
    model = SRVGGNetCompact(num_feat=8, num_conv=2, upscale=scale)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture()
def upscaler_folder(tmp_path, monkeypatch) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "upscalers"
    folder.mkdir()
    save_file(_compact(2), str(folder / "2x-compact.safetensors"))
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).resize((96, 96), Image.Resampling.BOX)


# --- tiling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(100, 40, 10), (71, 40, 10), (40, 40, 8), (257, 64, 16), (65, 64, 0)])
def test_tiles_cover_the_image_and_overlap_enough(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap  # neighbours overlap by at least the asked overlap
        assert b > a


def test_tiled_network_matches_whole_image_and_overlap_hides_seams(photo):
    """A conv net run tile by tile with overlap gives the whole-image result; cut into
    tiles that merely touch, the tile borders show (zero padding at every cut)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(8, 3, 3, padding=1), torch.nn.Sigmoid()).eval()

    def upscale2x(tile: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(net(tile), scale_factor=2, mode="nearest")

    x = pil_to_tensor(photo)
    with torch.no_grad():
        whole = upscale2x(x)
        tiled = process_tiled(x, upscale2x, scale=2, tile=40, overlap=12)
        touching = process_tiled(x, upscale2x, scale=2, tile=32, overlap=0)  # 96 = 3 x 32: no overlap at all
    assert tiled.shape == whole.shape == (1, 3, 192, 192)
    assert (tiled - whole).abs().max() < 1e-5
    assert (touching - whole).abs().max() > 0.05


def test_tiling_errors_say_what_to_do():
    with pytest.raises(InvalidParameter, match="twice the overlap"):
        check_tiling(100, 100, 32, 16)
    with pytest.raises(ImageError, match="too large for tile size 64.*larger tile"):
        check_tiling(4000, 4000, 64, 8, max_tiles=100)
    with pytest.raises(ImageError, match="too large to process in one piece.*tile"):
        check_tiling(3000, 3000, 0, 0, max_untiled_pixels=1000 * 1000)
    with pytest.raises(InvalidParameter):
        check_tiling(100, 100, -5, 0)


# --- the upscalers ----------------------------------------------------------------------------


def test_catalogue_has_latent_pixel_and_folder_models(upscaler_folder):
    catalogue = upscaler_catalogue()
    for name in ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest)", "Latent (nearest-exact)",
                 "Lanczos", "Nearest", "2x-compact"):
        assert name in catalogue
    assert get_upscaler("latent (NEAREST-exact)").name == "Latent (nearest-exact)"
    assert get_upscaler("2x-compact").kind == "model"


@pytest.mark.parametrize("name,mode", [("Latent", "bilinear"), ("Latent (bicubic)", "bicubic"), ("Latent (nearest)", "nearest"),
                                       ("Latent (nearest-exact)", "nearest-exact"), ("Latent (antialiased)", "bilinear")])
def test_latent_upscalers_resize_latents(name, mode):
    latents = torch.randn(2, 4, 8, 8)
    out = get_upscaler(name).upscale_latents(latents, (16, 24))
    assert out.shape == (2, 4, 16, 24)
    if mode == "nearest":
        torch.testing.assert_close(get_upscaler(name).upscale_latents(latents, (16, 16)),
                                   latents.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_latent_upscaler_on_a_picture_is_refused(photo):
    with pytest.raises(UnsupportedFeature, match="only works inside hires fix"):
        get_upscaler("Latent").upscale(photo, (192, 192))


def test_pixel_and_model_upscalers_reach_the_exact_size(upscaler_folder, photo):
    assert get_upscaler("Lanczos").upscale(photo, (200, 150)).size == (200, 150)
    model = get_upscaler("2x-compact")
    out = model.upscale(photo, (288, 288), UpscaleSettings(tile=48, overlap=8))  # 3x: two 2x passes, then Lanczos down
    assert out.size == (288, 288)
    # The model really ran: a random network's output is far from plain Lanczos.
    lanczos = np.asarray(photo.resize((288, 288), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - lanczos).mean() > 5


def test_upscaler_from_a_zoo_card(tmp_path, monkeypatch, photo):
    import json

    from safetensors.torch import save_file

    from aipaint.models import zoo

    weights = tmp_path / "weights" / "tiny-compact.safetensors"
    weights.parent.mkdir()
    save_file(_compact(2), str(weights))
    cards = tmp_path / "cards"
    cards.mkdir()
    card = {"id": "tiny-esrgan-x2", "family": "upscaler", "source": {"kind": "local", "path": str(weights)}}
    (cards / "tiny-esrgan-x2.json").write_text(json.dumps(card))
    monkeypatch.setenv("AIPAINT_ZOO_PATH", str(cards))
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(tmp_path / "empty"))
    zoo._cards.cache_clear()
    try:
        upscaler = get_upscaler("tiny-esrgan-x2")
        assert upscaler.kind == "model" and upscaler.path == weights
        assert upscaler.upscale(photo, (192, 192)).size == (192, 192)
    finally:
        monkeypatch.delenv("AIPAINT_ZOO_PATH")
        zoo._cards.cache_clear()


def test_unknown_upscaler_lists_the_valid_ones(upscaler_folder):
    with pytest.raises(UnknownName) as info:
        get_upscaler("4x-nothing")
    assert "2x-compact" in str(info.value) and "Lanczos" in str(info.value)


def test_names_never_leave_the_upscaler_folder(upscaler_folder, monkeypatch):
    """Real weights lie next to the folder, and the working directory is the folder itself,
    so a name read as a path relative to it would find them: every way out is refused."""
    from safetensors.torch import save_file

    outside = upscaler_folder.parent / "outside.safetensors"
    save_file(_compact(2), str(outside))
    (upscaler_folder.parent / "elsewhere").mkdir()
    save_file(_compact(2), str(upscaler_folder.parent / "elsewhere" / "x.safetensors"))
    (upscaler_folder / "link.safetensors").symlink_to(outside)
    (upscaler_folder / "linked").symlink_to(upscaler_folder.parent / "elsewhere", target_is_directory=True)
    monkeypatch.chdir(upscaler_folder)
    assert Path("../outside.safetensors").is_file()
    for name, why in (("../outside.safetensors", "'..'"), ("../outside", "'..'"), ("sub/../../outside", "'..'"),
                      (str(outside), "absolute"), (str(outside.with_suffix("")), "absolute"),
                      ("link", "link"), ("linked/x", "link")):
        with pytest.raises(NameOutsideFolder, match=why) as refused:
            resolve_weights(name, upscaler_folder)
        assert "4x-UltraSharp" in str(refused.value)  # advice for upscaler names, not LoRA tags
        with pytest.raises(NameOutsideFolder):
            get_upscaler(name)
    with pytest.raises(UnknownName):
        resolve_weights("outside", upscaler_folder)  # a bare name is looked up inside the folder only
    assert set(upscaler_catalogue().names()).isdisjoint({"link", "linked/x", "outside"})  # listings skip them too


def test_sub_folders_inside_the_upscaler_folder_resolve(upscaler_folder):
    from safetensors.torch import save_file

    (upscaler_folder / "esrgan").mkdir()
    save_file(_compact(2, seed=3), str(upscaler_folder / "esrgan" / "2x-sharp.safetensors"))
    expected = upscaler_folder / "esrgan" / "2x-sharp.safetensors"
    assert resolve_weights("esrgan/2x-sharp", upscaler_folder) == expected
    assert resolve_weights("esrgan/2x-sharp.safetensors", upscaler_folder) == expected
    assert resolve_weights("2x-sharp", upscaler_folder) == expected  # a unique stem, as A1111 finds it
    assert get_upscaler("esrgan/2x-sharp").path == expected and "esrgan/2x-sharp" in upscaler_catalogue()
    (upscaler_folder / "other").mkdir()
    save_file(_compact(2, seed=4), str(upscaler_folder / "other" / "2x-sharp.safetensors"))
    with pytest.raises(InvalidParameter, match="ambiguous.*esrgan/2x-sharp"):
        get_upscaler("2x-sharp")  # two sub-folders hold one: the name must say which


def test_an_explicit_path_is_only_taken_from_python_code(upscaler_folder, tmp_path):
    from safetensors.torch import save_file

    elsewhere = tmp_path / "elsewhere.safetensors"
    save_file(_compact(2), str(elsewhere))
    assert get_upscaler(elsewhere).path == elsewhere  # a Path object: the caller chose the file
    with pytest.raises(NameOutsideFolder):
        get_upscaler(str(elsewhere))  # the same text as a name (from a user) is refused
    with pytest.raises(ModelLoadError, match="missing weights file"):
        get_upscaler(tmp_path / "gone.safetensors")


def test_safetensors_first_and_pickles_only_on_request(upscaler_folder):
    torch.save(_compact(2, seed=1), upscaler_folder / "2x-compact.pth")
    torch.save(_compact(2, seed=1), upscaler_folder / "only-pickle.pth")
    files = weight_files(upscaler_folder)
    assert files["2x-compact"].suffix == ".safetensors"
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        load_image_model(files["only-pickle"])
    model = load_image_model(files["only-pickle"], allow_pickle=True)  # torch.load(weights_only=True)
    assert model.architecture == "RealESRGAN Compact" and model.scale == 2


def test_a_malicious_pickle_is_refused_even_when_pickles_are_allowed(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": Exploit()}))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_image_model(path, allow_pickle=True)


def test_weights_spandrel_does_not_know_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"some.weight": torch.zeros(3, 3)}, str(tmp_path / "mystery.safetensors"))
    with pytest.raises(ModelLoadError, match="does not recognise"):
        load_image_model(tmp_path / "mystery.safetensors")


# --- the post-processing chain ----------------------------------------------------------------


def test_post_step_parses_typed_values():
    step = PostStep.parse("hires:scale=2,denoising-strength=0.5,upscaler=Latent (bicubic),allow_pickle=true")
    assert step.name == "hires"
    assert step.options == {"scale": 2, "denoising_strength": 0.5, "upscaler": "Latent (bicubic)", "allow_pickle": True}
    with pytest.raises(InvalidParameter):
        PostStep.parse("hires:scale")


@pytest.mark.parametrize("value,expected", [("no", False), ("false", False), ("0", False), ("No", False), (0, False),
                                            (False, False), (None, False), ("yes", True), ("TRUE", True), (1, True), (True, True)])
def test_flag_reads_yes_and_no(value, expected):
    from aipaint.plugin.kit.options import option_bool

    assert option_bool({"allow_pickle": value}, "allow_pickle") is expected


@pytest.mark.parametrize("value", ["nope", "off-ish", "", 2, 0.5, [True]])
def test_flag_refuses_anything_else(value):
    from aipaint.plugin.kit.options import option_bool

    with pytest.raises(InvalidParameter, match="allow_pickle.*true or false"):
        option_bool({"allow_pickle": value}, "allow_pickle")


@pytest.fixture()
def pickle_only(upscaler_folder) -> str:
    """An upscaler that exists only as a pickle: it loads only with allow_pickle on."""
    torch.save(_compact(2, seed=1), upscaler_folder / "only-pickle.pth")
    return "only-pickle"


NO_PICKLE_STEPS = {
    "upscale": "upscale:upscaler=only-pickle,allow_pickle={}",
    "hires": "hires:upscaler=only-pickle,allow_pickle={},prompt=a cat,steps=2,hires_steps=2",
    "sd-upscale": "sd-upscale:upscaler=only-pickle,allow_pickle={},prompt=a cat,steps=2,tile_width=32,tile_height=32",
}


@pytest.mark.parametrize("processor", sorted(NO_PICKLE_STEPS))
@pytest.mark.parametrize("no", ["no", "false", "0", "False"])
def test_allow_pickle_no_keeps_pickles_refused(tiny_pipe, pickle_only, processor, no):
    """``allow_pickle=no`` from the command line's ``--post`` form means no, in every processor."""
    step = PostStep.parse(NO_PICKLE_STEPS[processor].format(no))
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        run_postprocessors(Image.new("RGB", (32, 32), (90, 30, 200)), [step], tiny_pipe)


@pytest.mark.parametrize("processor", sorted(NO_PICKLE_STEPS))
def test_allow_pickle_must_be_yes_or_no(tiny_pipe, pickle_only, processor):
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        run_postprocessors(Image.new("RGB", (32, 32)), [NO_PICKLE_STEPS[processor].format("nope")], tiny_pipe)


def test_allow_pickle_yes_loads_the_pickle(tiny_pipe, pickle_only):
    out = run_postprocessors(Image.new("RGB", (32, 32), (90, 30, 200)), [NO_PICKLE_STEPS["upscale"].format("yes")], tiny_pipe)
    assert out.image.size == (64, 64) and out.infotext["Postprocess upscaler"] == "only-pickle"
    hires = run_postprocessors(Image.new("RGB", (32, 32), (90, 30, 200)), [NO_PICKLE_STEPS["hires"].format("1")], tiny_pipe)
    assert hires.image.size == (64, 64) and hires.infotext["Hires upscaler"] == "only-pickle"


def test_allow_pickle_is_never_read_by_truthiness_from_python(tiny_pipe, pickle_only, photo):
    from aipaint_plugins.upscale.hires import HiresSettings
    from aipaint_plugins.upscale.sd_upscale import sd_upscale

    with pytest.raises(InvalidParameter, match="allow_pickle"):
        HiresSettings(allow_pickle="no")
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        sd_upscale(tiny_pipe, photo.resize((32, 32)), "a cat", upscaler="only-pickle", allow_pickle="no", steps=2)


def test_chain_runs_in_order_and_records_itself(plugin_host, photo):
    out = run_postprocessors(photo, ["upscale:upscaler=Nearest,scale=2", ("upscale", {"upscaler": "Lanczos", "scale": 0.5})],
                             host=plugin_host)
    assert out.image.size == photo.size
    assert out.infotext["Postprocess upscaler"] == "Lanczos"  # the later step wins
    assert out.infotext["Postprocess upscale by"] == "0.5"


def test_chain_checks_options_and_models_before_running(plugin_host, photo):
    with pytest.raises(UnknownName, match="scael"):
        run_postprocessors(photo, ["upscale:scael=2"], host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="load one"):
        run_postprocessors(photo, ["upscale", "hires"], host=plugin_host)
    with pytest.raises(UnknownName):
        run_postprocessors(photo, ["no-such-processor"], host=plugin_host)


def test_merge_infotext_keeps_version_last():
    text = "a cat\nSteps: 20, Seed: 1, Size: 32x32, Version: aipaint 0.1.0"
    merged = Infotext.from_text(merge_infotext(text, {"Hires upscale": "2", "Hires upscaler": "Latent"}))
    assert list(merged.params)[-1] == "Version"
    assert merged.params["Hires upscale"] == "2" and merged.prompt == "a cat"


# --- hires fix ----------------------------------------------------------------------------------


def test_hires_fix_doubles_the_size_and_records_a1111_parameters(tiny_pipe):
    from aipaint_plugins.upscale.hires import hires_fix

    from aipaint.api.request import GenerationRequest

    result = hires_fix(tiny_pipe, GenerationRequest("a red circle", width=32, height=32, steps=3, seed=5), hires_steps=0)
    assert result.image.size == (64, 64)
    params = Infotext.from_text(result.parameters).params
    assert params["Size"] == "32x32"  # as A1111: the base size, plus the hires settings
    assert (params["Hires upscale"], params["Hires upscaler"], params["Hires steps"], params["Denoising strength"]) == (
        "2", "Latent", "3", "0.6")


def test_hires_fix_on_a_result_keeps_each_seed(tiny_pipe):
    from aipaint_plugins.upscale.hires import hires_fix

    base = tiny_pipe.txt2img("a blue square", width=32, height=32, steps=2, seed=7, batch_size=2)
    result = hires_fix(tiny_pipe, base, upscaler="Lanczos", hires_steps=2, resize_to=(48, 40))
    assert [im.size for im in result.images] == [(48, 40), (48, 40)]
    assert result.seeds == [7, 8]
    second = Infotext.from_text(result.infotexts[1]).params
    assert second["Seed"] == "8" and second["Hires resize"] == "48x40" and second["Hires upscaler"] == "Lanczos"
    # The pass is seeded: the same call gives the same pictures.
    again = hires_fix(tiny_pipe, base, upscaler="Lanczos", hires_steps=2, resize_to=(48, 40))
    assert np.array_equal(np.asarray(again.images[1]), np.asarray(result.images[1]))


def _spy(monkeypatch, owner, name, calls):
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(owner, name, spy)


def test_latent_hires_fix_upscales_the_first_pass_latents(tiny_pipe, monkeypatch):
    """As in A1111: generating with a latent upscaler, the second pass starts from the first
    pass's own latents, resized; nothing is encoded and the first pass is never decoded."""
    from aipaint_plugins.upscale.hires import hires_fix
    from aipaint_plugins.upscale.upscalers import Upscaler

    from aipaint.api.request import GenerationRequest

    loops, resized, encoded, decoded = [], [], [], []
    import aipaint.engine.run

    _spy(monkeypatch, aipaint.engine.run, "denoise", loops)
    _spy(monkeypatch, Upscaler, "upscale_latents", resized)
    _spy(monkeypatch, tiny_pipe.model, "encode", encoded)
    _spy(monkeypatch, tiny_pipe.model, "decode", decoded)
    request = GenerationRequest("a red circle", width=32, height=32, steps=3, seed=5, batch_size=2)
    result = hires_fix(tiny_pipe, request, upscaler="Latent (nearest)", hires_steps=2)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)] and result.seeds == [5, 6]
    assert Infotext.from_text(result.infotexts[1]).params["Seed"] == "6"
    assert encoded == []
    first_pass = loops[0][1]
    h, w = first_pass.shape[-2:]
    assert first_pass.shape[0] == 2 and len(resized) == 2
    assert [tuple(args[0].shape[-2:]) for args, _ in decoded] == [(2 * h, 2 * w)] * 2  # only the hires latents
    for index, ((_, latents, _), upscaled) in enumerate(resized):
        torch.testing.assert_close(latents, first_pass[index : index + 1])  # image i starts from its own latents
        torch.testing.assert_close(upscaled, first_pass[index : index + 1].repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_latent_hires_fix_on_a_finished_picture_encodes_it(tiny_pipe, monkeypatch):
    """A Result has only pixels left: the latent upscaler works on their encoding."""
    from aipaint_plugins.upscale.hires import hires_fix

    base = tiny_pipe.txt2img("a red circle", width=32, height=32, steps=3, seed=5)
    encoded = []
    _spy(monkeypatch, tiny_pipe.model, "encode", encoded)
    assert hires_fix(tiny_pipe, base, upscaler="Latent", hires_steps=2).image.size == (64, 64)
    assert len(encoded) == 1


def test_hires_post_processor_in_a_chain(tiny_pipe):
    from aipaint.engine.postprocessing import postprocess_result

    base = tiny_pipe.txt2img("a green cross", width=32, height=32, steps=2, seed=3)
    out = postprocess_result(base, ["hires:scale=1.5,upscaler=Latent (nearest),hires_steps=2"], tiny_pipe)
    assert out.image.size == (48, 48)
    params = Infotext.from_text(out.parameters).params
    assert params["Hires upscaler"] == "Latent (nearest)" and params["Hires steps"] == "2" and params["Seed"] == "3"


def test_hires_settings_are_checked(tiny_pipe):
    from aipaint_plugins.upscale.hires import hires_fix

    from aipaint.api.request import GenerationRequest

    request = GenerationRequest("x", width=32, height=32, steps=2, seed=1)
    with pytest.raises(InvalidParameter, match="scale"):
        hires_fix(tiny_pipe, request, scale=0.5)
    with pytest.raises(InvalidParameter, match="runs no step"):
        hires_fix(tiny_pipe, request, denoising_strength=0.1)
    with pytest.raises(UnknownName):
        hires_fix(tiny_pipe, request, upscaler="8x-nothing")


def test_sd_upscale_redraws_tiles_into_a_larger_picture(tiny_pipe, photo):
    from aipaint_plugins.upscale.sd_upscale import sd_upscale

    small = photo.resize((40, 40))
    out, info = sd_upscale(tiny_pipe, small, "an astronaut", scale=2, tile_width=32, tile_height=32, steps=2, seed=1)
    assert out.size == (80, 80)
    assert info["SD upscale upscaler"] == "Lanczos" and info["SD upscale overlap"] == "4"
    lanczos = np.asarray(small.resize((80, 80), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - lanczos).mean() > 1  # the tiles were really redrawn


# --- command line -------------------------------------------------------------------------------


def test_upscale_command_writes_a_png_with_parameters(upscaler_folder, photo, tmp_path):
    from aipaint.cli.main import main
    from aipaint.infotext import read_png_parameters

    source = tmp_path / "in.png"
    photo.save(source)
    out = tmp_path / "out.png"
    assert main(["upscale", str(source), "--upscaler", "2x-compact", "--tile", "48", "-o", str(out)]) == 0
    assert Image.open(out).size == (192, 192)
    assert "Postprocess upscaler: 2x-compact" in read_png_parameters(out)
    assert main(["upscale", str(source), "--upscaler", "nope", "-o", str(out)]) == 2


# --- behaviour on the embedded model --------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_pipe(plugin_host):
    if not (SHAPES_MODEL / "unet").is_dir():
        pytest.skip("the embedded shapes-tiny model is not trained yet (zoo/models/shapes-tiny)")
    import aipaint

    return aipaint.load(host=plugin_host)


CAPTIONS = (
    "a big red circle on the left, on a white background",
    "a small blue square on the right, on a black background",
    "a big yellow triangle at the top, on a gray background",
)


@pytest.fixture(scope="module")
def embedded_hires(shapes_pipe):
    """Base pictures of three different scenes, and their hires versions (2x, default strength)."""
    from aipaint_plugins.upscale.hires import hires_fix

    bases = [shapes_pipe.txt2img(caption, seed=11) for caption in CAPTIONS]
    return bases, {up: [hires_fix(shapes_pipe, base, upscaler=up) for base in bases] for up in ("Latent", "Lanczos")}


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_keeps_the_composition_on_the_embedded_model(embedded_hires, upscaler):
    """Downscaled back to the base size, each hires picture is much closer to its own base
    than to the other scenes' bases, and keeps the base's background."""
    from aipaint_plugins.shapes_world.evaluate import read_scene

    bases, hires = embedded_hires
    for index, (base, big) in enumerate(zip(bases, hires[upscaler])):
        w, h = base.image.size
        assert big.image.size == (2 * w, 2 * h)
        assert "Hires upscale: 2" in big.parameters and f"Hires upscaler: {upscaler}" in big.parameters
        down = np.asarray(big.image.resize((w, h), Image.Resampling.BOX), dtype=float)
        distances = [np.abs(down - np.asarray(other.image, dtype=float)).mean() for other in bases]
        own = distances[index]
        assert own < 0.5 * min(d for i, d in enumerate(distances) if i != index), (index, distances)
        assert read_scene(big.image.resize((w, h), Image.Resampling.BOX)).background == read_scene(base.image).background


@pytest.mark.xfail(strict=True, reason=(
    "shapes-tiny was trained only at 32 px: at 64 px its UNet splits a shape into several small ones "
    "(plain img2img at 64 px does so even at strength 0.1), as SD 1.5 repeats subjects far above its "
    "training size; hires fix cannot keep the object count on this model"))
def test_hires_fix_keeps_the_objects_on_the_embedded_model(embedded_hires):
    from aipaint_plugins.shapes_world.evaluate import read_scene

    bases, hires = embedded_hires
    base, big = bases[0], hires["Lanczos"][0]
    down = big.image.resize(base.image.size, Image.Resampling.BOX)
    assert len(read_scene(down).objects) == len(read_scene(base.image).objects)
