"""Hostile files, images, sizes and security flags: each gives a typed one-line error
(exit 2 on the command line), never a traceback, a clobbered file or a pickle loaded."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from aipaint.api.request import GenerationRequest
from aipaint.api.result import Result, save_png
from aipaint.cli import api as cli_api
from aipaint.cli.main import main
from aipaint.errors import DownloadError, ImageError, InvalidParameter

SMALL = ["-W", "32", "-H", "32", "--steps", "1", "--no-progress"]
LONG_NAME = "x" * 300  # one path part over the 255 bytes file systems allow
ALMOST_LONG = "y" * 250  # fits, but not with ".safetensors" added


def one_line_error(capsys, *expected: str) -> str:
    """The command's stderr, checked to be one ``aipaint: error:`` line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("aipaint: error:") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A real 20000x20000 1-bit PNG (400 MP, 48 KB on disk): what PIL refuses as a decompression bomb."""
    width = height = 20000
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width // 8)  # filter byte + one bit per pixel
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def small_png(tmp_path) -> Path:
    """A 32x32 white image: an input image, or a mask that repaints everything."""
    path = tmp_path / "small.png"
    Image.new("RGB", (32, 32), "white").save(path)
    return path


class FakePipe:
    """Stands in for a loaded pipeline where only the command line's file handling is under test."""

    def generate(self, request, progress=None, preview=None) -> Result:
        n = request.batch_size
        return Result([Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(n)], list(range(n)), ["fake"] * n, request,
                      {"total": 0.0})


@pytest.fixture
def fake_pipe(monkeypatch):
    monkeypatch.setattr(cli_api, "load_pipeline", lambda args: FakePipe())


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    def refuse(args):
        raise AssertionError("the model was loaded: the check did not come before the generation")

    monkeypatch.setattr(cli_api, "load_pipeline", refuse)


# ------------------------------------------------------------------ security flags
def _pickled_controlnet(tiny_sd_path: Path, path: Path) -> Path:
    """The tiny model's ControlNet as a torch.save pickle (diffusers layout)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet")
    torch.save(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).state_dict(), path)
    return path


@pytest.fixture
def controlnet_dir(tiny_sd_path, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "controlnet"
    folder.mkdir()
    _pickled_controlnet(tiny_sd_path, folder / "pickled.pth")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(folder))
    return folder


@pytest.mark.parametrize(
    ("unit_flag", "cli_flag", "loads"),
    [
        (":allow_pickle=false", [], False),  # bool("false") is True: this used to load the pickle
        (":allow_pickle=no", ["--allow-pickle"], False),  # the unit's own "no" wins over the run's opt-in
        ("", ["--allow-pickle"], True),  # --allow-pickle covers every file of the run, ControlNets too
        (":allow_pickle=yes", [], True),
    ],
)
def test_controlnet_allow_pickle_is_a_typed_boolean(unit_flag, cli_flag, loads, controlnet_dir, tiny_sd_path, small_png,
                                                     tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "x", "-m", str(tiny_sd_path), *SMALL, *cli_flag, "--controlnet",
                 f"pickled:{small_png}:none{unit_flag}", "-o", str(out)])
    if loads:
        assert code == 0 and out.is_file()
    else:
        assert code == 2 and not out.exists()
        one_line_error(capsys, "refusing to load pickled.pth", "--allow-pickle")


def test_controlnet_allow_pickle_rejects_anything_else(controlnet_dir, tiny_sd_path, small_png, tmp_path, capsys):
    assert main(["generate", "x", "-m", str(tiny_sd_path), *SMALL, "--controlnet",
                 f"pickled:{small_png}:none:allow_pickle=nope", "-o", str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "allow_pickle", "'nope'", "must be true or false")


@pytest.mark.parametrize("value", ["no", "false", 0, None, 1.0])
def test_request_allow_pickle_must_be_a_bool(value):
    """What the LoRA and embedding folders read: ``extra["allow_pickle"] = "no"`` used to switch pickles on."""
    with pytest.raises(InvalidParameter, match=r"allow_pickle.*must be True or False"):
        GenerationRequest("x", allow_pickle=value)


def test_pickle_opt_ins_of_the_python_api_must_be_bools(tmp_path):
    from aipaint.models.loading import resolve_source
    from aipaint.models.weights import load_state_dict
    from aipaint.plugin.kit.folders import ModelFolder

    (tmp_path / "style.pt").write_bytes(b"not loaded")
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        ModelFolder(tmp_path, "lora", allow_pickle="no")
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        load_state_dict(tmp_path / "style.pt", allow_pickle="no")
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        resolve_source(str(tmp_path / "style.pt"), allow_pickle="false")


class Payload:
    """A pickle that would create ``marker`` when unpickled by a permissive loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickle_refusal_is_one_line_naming_the_file(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(1)}, ckpt)
    assert main(["generate", "x", "-m", str(ckpt), "-o", str(tmp_path / "o.png")]) == 2
    err = one_line_error(capsys, "model.ckpt", ".safetensors", "--allow-pickle")
    assert "weights_only=False" not in err


def test_a_pickle_with_code_is_refused_in_one_line_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, ckpt)
    assert main(["generate", "x", "-m", str(ckpt), "--allow-pickle", "-o", str(tmp_path / "o.png")]) == 2
    err = one_line_error(capsys, "evil.ckpt", "os.makedirs", ".safetensors")
    assert "weights_only=False" not in err and "Re-running" not in err
    assert not marker.exists()


def test_a_pickled_file_in_a_diffusers_folder_is_a_typed_error(tiny_sd_path, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_path, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state: dict = dict(load_file(weights))
    weights.unlink()
    marker = tmp_path / "ran"
    state["payload"] = Payload(marker)
    torch.save(state, folder / "text_encoder" / "pytorch_model.bin")
    assert main(["generate", "x", "-m", str(folder), "--allow-pickle", *SMALL, "-o", str(tmp_path / "o.png")]) == 2
    err = one_line_error(capsys, str(folder), "os.makedirs", ".safetensors")
    assert "weights_only=False" not in err
    assert not marker.exists()


# ------------------------------------------------------------------ decompression bombs
@pytest.mark.parametrize(
    "command",
    [
        ["info", "{bomb}"],
        ["generate", "--from-png", "{bomb}"],
        ["img2img", "{bomb}", "x"],
        ["inpaint", "{bomb}", "{small}", "x"],
        ["inpaint", "{small}", "{bomb}", "x"],
        ["upscale", "{bomb}"],
    ],
    ids=["info", "from-png", "img2img", "inpaint-image", "inpaint-mask", "upscale"],
)
def test_decompression_bomb_is_a_typed_error(command, bomb, small_png, tmp_path, capsys, no_generation):
    args = [part.format(bomb=bomb, small=small_png) for part in command]
    if args[0] != "info":
        args += ["-o", str(tmp_path / "out.png")]
    assert main(args) == 2
    one_line_error(capsys, str(bomb), f"{Image.MAX_IMAGE_PIXELS:,} pixels")


def test_decompression_bomb_as_a_controlnet_image(bomb):
    from aipaint_plugins.controlnet.units import load_image

    with pytest.raises(ImageError, match="bomb.png.*more than"):
        load_image(bomb, "ControlNet 0 image")


def test_an_image_just_over_the_limit_is_refused_too(tmp_path, monkeypatch):
    """PIL only warns between its limit and twice that: here that is a refusal as well."""
    from aipaint.imageutil import load_image

    path = tmp_path / "big.png"
    Image.new("1", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 pixels: over the limit, under twice it
    with pytest.raises(ImageError, match="more than 6,000 pixels"):
        load_image(path)


# ------------------------------------------------------------------ names too long
def test_lora_name_too_long(tmp_path, capsys, fake_pipe):
    from aipaint.plugin.kit.folders import ModelFolder

    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "ink.safetensors").write_bytes(b"")
    folder = ModelFolder(tmp_path / "loras", "lora")
    with pytest.raises(InvalidParameter, match="too long"):
        folder.resolve(LONG_NAME)
    with pytest.raises(InvalidParameter, match="valid values are 'ink'"):
        folder.resolve(ALMOST_LONG)  # the file system refuses ALMOST_LONG.safetensors as a name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", f"<lora:{LONG_NAME}:1>", "--lora-dir", "{tmp}"], "too long"),
        (["generate", f"<lora:{ALMOST_LONG}:1>", "--lora-dir", "{tmp}"], "was not found"),
        (["generate", "<lora:ink:1>", "--lora-dir", f"{{tmp}}/{LONG_NAME}"], "was not found"),
        (["generate", f"x {ALMOST_LONG}", "--embeddings-dir", f"{{tmp}}/{LONG_NAME}", "--lora-dir", "{tmp}",
          "--controlnet", f"{LONG_NAME}:{{small}}"], "too long"),
        (["generate", "x", "--controlnet", f"{ALMOST_LONG}:{{small}}"], "ControlNet model"),
        (["upscale", "{small}", "--upscaler", LONG_NAME], "invalid upscaler="),
        (["upscale", "{small}", "--upscaler", ALMOST_LONG], "invalid upscaler="),
    ],
    ids=["lora", "lora-almost", "lora-dir", "embeddings-dir+controlnet", "controlnet-almost", "upscaler", "upscaler-almost"],
)
def test_names_too_long_are_typed_errors(args, message, tiny_sd_path, small_png, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(tmp_path))
    args = [part.format(tmp=tmp_path, small=small_png) for part in args]
    if args[0] == "generate":
        args += ["-m", str(tiny_sd_path), *SMALL]
    assert main([*args, "-o", str(tmp_path / "out.png")]) == 2
    one_line_error(capsys, message)


# ------------------------------------------------------------------ output files
@pytest.mark.parametrize(
    "command",
    [["generate", "x"], ["img2img", "{small}", "x"], ["inpaint", "{small}", "{small}", "x"],
     ["outpaint", "{small}", "x", "--left", "8"], ["upscale", "{small}"]],
    ids=["generate", "img2img", "inpaint", "outpaint", "upscale"],
)
@pytest.mark.parametrize("where", ["folder", "under-a-file", "existing"])
def test_output_is_checked_before_generating(command, where, small_png, tmp_path, capsys, no_generation):
    target = {"folder": tmp_path / "folder", "under-a-file": small_png / "out.png", "existing": tmp_path / "old.png"}[where]
    (tmp_path / "folder").mkdir()
    (tmp_path / "old.png").write_bytes(b"earlier image")
    args = [part.format(small=small_png) for part in command]
    assert main([*args, "-o", str(target)]) == 2
    one_line_error(capsys, "invalid output=", target.name)
    assert (tmp_path / "old.png").read_bytes() == b"earlier image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "old.png", "small.png"]  # no temporary left


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/sys/kernel"),
                    reason="needs a folder nobody may create files in, even root: Linux's /sys")
def test_an_unwritable_output_folder_is_refused_before_generating(capsys, no_generation):
    assert main(["generate", "x", "-o", "/sys/kernel/aipaint.png"]) == 2
    one_line_error(capsys, "/sys/kernel/aipaint.png", "cannot be written")


def test_overwrite_replaces_and_its_absence_keeps(tmp_path, capsys, fake_pipe):
    out = tmp_path / "out.png"
    out.write_bytes(b"earlier image")
    assert main(["generate", "x", "-o", str(out), "--no-progress"]) == 2
    one_line_error(capsys, "exists already", "--overwrite")
    assert out.read_bytes() == b"earlier image"
    assert main(["generate", "x", "-o", str(out), "--no-progress", "--overwrite"]) == 0
    assert Image.open(out).size == (8, 8)


def test_a_batch_never_replaces_any_of_its_files(tmp_path, capsys, fake_pipe):
    (tmp_path / "b-1.png").write_bytes(b"earlier image")
    assert main(["generate", "x", "--batch-size", "2", "-o", str(tmp_path / "b.png"), "--no-progress"]) == 2
    one_line_error(capsys, "b-1.png", "exists already")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-1.png"]


def test_without_output_a_free_numbered_name_is_chosen(tmp_path, monkeypatch, capsys, fake_pipe):
    monkeypatch.chdir(tmp_path)
    written = []
    for extra in ([], [], ["--batch-size", "2"], []):
        assert main(["generate", "x", "--no-progress", *extra]) == 0
        written.append(capsys.readouterr().out.split())
    assert written == [["aipaint.png"], ["aipaint-1.png"], ["aipaint-1-0.png", "aipaint-1-1.png"], ["aipaint-2.png"]]
    assert main(["upscale", "aipaint.png"]) == 0
    assert main(["upscale", "aipaint.png"]) == 0
    assert capsys.readouterr().out.split() == ["aipaint-upscaled.png", "aipaint-upscaled-1.png"]


def test_a_file_that_appears_while_saving_is_not_replaced(tmp_path, monkeypatch):
    import aipaint.api.result

    out = tmp_path / "out.png"
    real_check = aipaint.api.result.check_writable

    def check_then_race(path, *, overwrite=False):
        real_check(path, overwrite=overwrite)
        Path(path).write_bytes(b"another process")  # appears after the check, before the rename

    monkeypatch.setattr(aipaint.api.result, "check_writable", check_then_race)
    with pytest.raises(InvalidParameter, match="appeared while aipaint was writing it"):
        save_png(Image.new("RGB", (4, 4)), out, "x", overwrite=False)
    assert out.read_bytes() == b"another process"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_saving_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    out = save_png(Image.new("RGB", (4, 4), "blue"), tmp_path / "out.png", "x", overwrite=False)
    assert Image.open(out).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(InvalidParameter, match="exists already"):
        save_png(Image.new("RGB", (4, 4)), out, "x", overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_saving_follows_no_planted_link(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.png"
    # The name the writer used to pick (.NAME.PID.tmp), planted as a link to the victim.
    (tmp_path / f".out.png.{os.getpid()}.tmp").symlink_to(victim)
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        opened.append((str(path), flags))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    save_png(Image.new("RGB", (4, 4)), out, "x")
    save_png(Image.new("RGB", (4, 4)), out, "x")
    assert victim.read_text() == "precious" and Image.open(out).size == (4, 4)
    temporaries = [(path, flags) for path, flags in opened if path.endswith(".tmp") and ".out.png." in path]
    assert len(temporaries) == 2 and temporaries[0][0] != temporaries[1][0]  # a fresh random name each time
    assert all(flags & os.O_EXCL and flags & os.O_CREAT for _, flags in temporaries)  # never opens what is there


# ------------------------------------------------------------------ sizes
def test_upscale_to_a_huge_size_is_refused_before_allocating(small_png, tmp_path, capsys):
    assert main(["upscale", str(small_png), "--resize-to", "100000x100000", "-o", str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "100000x100000", "16,777,216", "AIPAINT_MAX_PIXELS")


def test_a_model_upscaler_pass_past_the_limit_is_refused(tmp_path, monkeypatch):
    """A 4x model asked for 1.1x would first make a 4x image: that pass is checked too."""
    from aipaint_plugins.upscale.upscalers import get_upscaler
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    save_file(SRVGGNetCompact(num_feat=8, num_conv=2, upscale=4).state_dict(), str(tmp_path / "4x-tiny.safetensors"))
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(tmp_path))
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", str(300 * 300))
    upscaler = get_upscaler("4x-tiny")
    assert upscaler.upscale(Image.new("RGB", (50, 50)), (55, 55)).size == (55, 55)  # a 200x200 pass: within the limit
    with pytest.raises(InvalidParameter, match="4x-tiny output='400x400'.*90,000"):
        upscaler.upscale(Image.new("RGB", (100, 100)), (110, 110))


def test_preprocess_to_a_huge_size_is_refused_before_allocating(small_png, tmp_path, capsys):
    assert main(["preprocess", str(small_png), "-W", "100000", "-H", "100000", "-o", str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "100000x100000", "16,777,216", "AIPAINT_MAX_PIXELS")


def test_outpainting_past_the_pixel_limit_is_refused_before_allocating(tiny_sd_path, small_png, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", str(2000 * 2000))
    assert main(["outpaint", str(small_png), "x", "--left", "4000", "--top", "4000", "-m", str(tiny_sd_path),
                 "--no-progress", "-o", str(tmp_path / "o.png")]) == 2
    one_line_error(capsys, "outpainted image", "4032x4032", "4,000,000", "AIPAINT_MAX_PIXELS")


def test_the_pixel_limit_is_configurable(monkeypatch):
    from aipaint.imageutil import resize_image

    assert GenerationRequest("x", width=1024, height=1024).width == 1024
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", str(512 * 512))
    with pytest.raises(InvalidParameter, match="1024x1024.*262,144"):
        GenerationRequest("x", width=1024, height=1024)
    monkeypatch.setenv("AIPAINT_MAX_PIXELS", "lots")
    with pytest.raises(InvalidParameter, match="AIPAINT_MAX_PIXELS='lots'"):
        GenerationRequest("x", width=64, height=64)
    monkeypatch.delenv("AIPAINT_MAX_PIXELS")
    # Covering 4096x4096 with a 1x4000 image would first scale it to 4096x16,384,000.
    with pytest.raises(InvalidParameter, match="resized image"):
        resize_image(Image.new("RGB", (1, 4000)), 4096, 4096, "crop and resize")


@pytest.mark.parametrize(
    "field",
    ["steps", "seed", "batch_size", "clip_skip", "width", "height", "subseed", "seed_resize_from_w", "seed_resize_from_h",
     "mask_blur", "inpaint_full_res_padding", "outpaint_left", "outpaint_top", "outpaint_right", "outpaint_bottom"],
)
@pytest.mark.parametrize("value", [2.0, True])
def test_integer_fields_take_ints_only(field, value):
    with pytest.raises(InvalidParameter, match=f"invalid {field}=.*must be an integer"):
        GenerationRequest("x", **{field: 16.0 if value == 2.0 and field in ("width", "height") else value})


def test_txt2img_batch_size_float_is_refused_before_generating(tiny_pipe):
    with pytest.raises(InvalidParameter, match=r"invalid batch_size=2\.0: must be an integer"):
        tiny_pipe.txt2img("x", batch_size=2.0, steps=1, width=32, height=32)


# ------------------------------------------------------------------ hashes
def test_zoo_verification_reads_the_bytes_not_the_cache(tmp_path, monkeypatch):
    from aipaint.models import zoo
    from aipaint.plugin.kit.hashing import sha256_bytes, sha256_file

    monkeypatch.setenv("AIPAINT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    with open(weights, "wb") as f:
        f.truncate(65 << 20)  # big enough for the display cache to remember it
    published = sha256_bytes(weights)
    assert sha256_file(weights) == published  # now cached by (path, size, mtime)
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x01")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the edit hides its mtime
    assert sha256_file(weights) == published  # the display cache is fooled, by design
    with pytest.raises(DownloadError, match="sha256"):
        zoo._verify(weights, published)


def test_a_bomb_among_video_frames_is_a_typed_error(bomb, tmp_path):
    from aipaint_plugins.video.stylize import open_frames

    from aipaint.errors import ImageError

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.new("RGB", (16, 16)).save(frames / "0001.png")
    shutil.copy(bomb, frames / "0002.png")
    source = open_frames(frames)
    with pytest.raises(ImageError, match="pixels"):
        list(source)


def test_an_export_manifest_check_hashes_the_bytes(tmp_path, monkeypatch):
    """A file edited with its size and mtime restored must fail the manifest's sha256 check."""
    from aipaint.errors import ModelLoadError
    from aipaint.plugin.kit.exports import Manifest, file_record
    from aipaint.plugin.kit.hashing import sha256_file

    monkeypatch.setenv("AIPAINT_CACHE", str(tmp_path / "cache"))
    graph = tmp_path / "unet.onnx"
    with open(graph, "wb") as f:
        f.truncate(65 << 20)  # big enough for the display cache to remember it
    manifest = Manifest(tmp_path, {"components": {"unet": {"file": "unet.onnx", "files": {"unet.onnx": file_record(graph)}}}})
    manifest.check_files()
    assert sha256_file(graph) == manifest.components["unet"]["files"]["unet.onnx"]["sha256"]  # now cached
    stat = graph.stat()
    with open(graph, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x01")
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ModelLoadError, match="sha256"):
        manifest.check_files()


@pytest.mark.parametrize("command", [["sticker", "{image}"], ["preprocess", "{image}", "-p", "canny"],
                                     ["qr", "https://example.org", "--image", "{image}"]])
def test_image_commands_never_replace_a_file_unless_asked(command, tmp_path, capsys, monkeypatch):
    from PIL import ImageDraw

    monkeypatch.chdir(tmp_path)  # qr's default output is in the working folder

    photo = tmp_path / "photo.png"
    picture = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(picture).ellipse((28, 28, 68, 68), fill=(200, 40, 40))  # a subject for the sticker to cut out
    picture.save(photo)
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"an earlier image")
    argv = [part.format(image=photo) for part in command]
    assert main([*argv, "-o", str(taken)]) == 2
    one_line_error(capsys, "exists")
    assert taken.read_bytes() == b"an earlier image"
    assert main([*argv, "-o", str(taken), "--overwrite"]) == 0
    assert taken.read_bytes() != b"an earlier image"
    # Without -o, a second run picks the next free name instead of replacing the first.
    capsys.readouterr()
    for _ in range(2):
        assert main(argv) == 0
    first, second = capsys.readouterr().out.split()[-2:] if command[0] != "qr" else [
        line for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert first != second and Path(first).is_file() and Path(second).is_file()
