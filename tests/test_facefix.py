"""Face fix (ADetailer-style detect → inpaint) and face restoration (plugins/facefix)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from aipaint_plugins.facefix.detect import HaarDetector, get_detector
from aipaint_plugins.facefix.fix import FaceFixSettings, detect_faces, face_fix, restore_faces
from aipaint_plugins.facefix.masks import box_mask, crop_region, feather, paste
from PIL import Image

from aipaint.engine.postprocessing import run_postprocessors
from aipaint.errors import InvalidParameter, ModelLoadError, UnknownName, UnsafeFileError, UnsupportedFeature

ASTRONAUT_FACE = (177, 66, 272, 161)  # where Eileen Collins' face is in skimage.data.astronaut() (512 px)


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def small_astronaut(astronaut) -> Image.Image:
    return astronaut.resize((256, 256), Image.Resampling.BOX)


# --- detection on real photographs --------------------------------------------------------------


def test_haar_detector_finds_the_astronauts_face(astronaut):
    faces, name = detect_faces(astronaut)
    assert name == "face_haar"
    assert len(faces) == 1
    assert _iou(faces[0].box, ASTRONAUT_FACE) > 0.6
    assert faces[0].score > 0.8


@pytest.mark.parametrize("photo", ["coffee", "chelsea", "rocket"])
def test_haar_detector_finds_no_face_where_there_is_none(photo):
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, photo)())
    assert detect_faces(image)[0] == []


def test_confidence_filters_detections(astronaut):
    assert detect_faces(astronaut, confidence=0.999)[0] == []


def test_unknown_detector_and_missing_weights_are_typed_errors(tmp_path, monkeypatch):
    with pytest.raises(UnknownName):
        get_detector("face_yolov99.pt")
    monkeypatch.setenv("AIPAINT_DETECTOR_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="YuNet"):
        get_detector("yunet")


def test_a_detector_can_be_any_callable(small_astronaut):
    from aipaint_plugins.facefix.detect import Detection

    found, name = detect_faces(small_astronaut, lambda image: [Detection((1, 2, 30, 40), 0.9)])
    assert [d.box for d in found] == [(1, 2, 30, 40)]
    assert name == "<lambda>"
    assert isinstance(get_detector("face_haar_alt"), HaarDetector)


# --- masks ------------------------------------------------------------------------------------------


def test_feathered_mask_is_zero_outside_and_one_deep_inside():
    mask = box_mask((64, 64), (20, 20, 40, 40), dilation=2)
    alpha = feather(mask, 4)
    assert alpha[~mask].max() == 0
    assert alpha[30, 30] == 1.0
    assert 0 < alpha[18, 30] < 1  # the edge fades inward
    # A mask touching the image border does not fade along the border.
    edge = feather(box_mask((64, 64), (0, 0, 20, 20), 0), 4)
    assert edge[0, 8] == 1.0


def test_paste_keeps_pixels_outside_the_mask_bit_for_bit():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    patch = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = feather(box_mask((32, 32), (8, 8, 24, 24), 0), 3)
    out = paste(base, patch, alpha)
    outside = alpha == 0
    assert np.array_equal(out[outside], base[outside])
    assert np.array_equal(out[alpha == 1], patch[alpha == 1])


def test_crop_region_has_the_aspect_and_stays_inside():
    for box in [(0, 0, 10, 10), (90, 5, 100, 30), (40, 40, 60, 50)]:
        x0, y0, x1, y1 = crop_region(box, (100, 80), padding=8, aspect=1.0)
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 80
        assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3]
        assert abs((x1 - x0) - (y1 - y0)) <= 1


# --- face fix (detect → inpaint) -----------------------------------------------------------------------


def _needs_inpaint(pipe) -> None:
    if not hasattr(pipe, "inpaint"):
        pytest.skip("this aipaint has no Pipeline.inpaint yet")


def test_face_fix_changes_only_the_face_regions(tiny_pipe, small_astronaut):
    _needs_inpaint(tiny_pipe)
    settings = FaceFixSettings(inpaint_width=64, inpaint_height=64, denoising_strength=0.5)
    out, info, report = face_fix(tiny_pipe, small_astronaut, "a face", settings=settings, steps=3, seed=1)
    before, after = np.asarray(small_astronaut), np.asarray(out)
    assert len(report.detections) == 1
    face = report.union
    assert np.array_equal(after[~face], before[~face])  # outside the face mask: unchanged, bit for bit
    changed = np.any(after != before, axis=2)
    assert changed[face].mean() > 0.5  # inside: really redrawn
    assert info["ADetailer model"] == "face_haar"
    assert info["ADetailer denoising strength"] == "0.5"
    assert info["ADetailer confidence"] == "0.3"


def test_face_fix_without_faces_returns_the_image_and_never_diffuses():
    import skimage.data

    def refuse(*args, **kwargs):
        raise AssertionError("inpaint must not run when no face is found")

    pipe = SimpleNamespace(inpaint=refuse, model=SimpleNamespace(defaults=SimpleNamespace(width=64, height=64)))
    image = Image.fromarray(skimage.data.coffee())
    out, info, report = face_fix(pipe, image, "a face")
    assert report.detections == [] and np.array_equal(np.asarray(out), np.asarray(image))


def test_face_fix_in_a_chain_after_generation_reuses_the_prompt(tiny_pipe, small_astronaut):
    _needs_inpaint(tiny_pipe)
    from aipaint.api.request import GenerationRequest
    from aipaint.infotext import Infotext
    from aipaint.plugin.postprocess import merge_infotext

    request = GenerationRequest("an astronaut", width=64, height=64, steps=2, seed=4)
    out = run_postprocessors(small_astronaut, ["facefix:inpaint_width=64,inpaint_height=64"], tiny_pipe, request=request)
    params = Infotext.from_text(merge_infotext("an astronaut\nSteps: 2, Seed: 4, Size: 64x64", out.infotext)).params
    assert params["ADetailer model"] == "face_haar" and "ADetailer prompt" not in params
    assert out.image.size == small_astronaut.size


def test_face_fix_needs_a_model_and_a_prompt(plugin_host, small_astronaut):
    with pytest.raises(UnsupportedFeature, match="load one"):
        run_postprocessors(small_astronaut, ["facefix"], host=plugin_host)
    pipe = SimpleNamespace(inpaint=None, model=SimpleNamespace(defaults=SimpleNamespace(width=64, height=64)))
    with pytest.raises(InvalidParameter, match="prompt"):
        face_fix(pipe, small_astronaut)


# --- face restoration ------------------------------------------------------------------------------


def _whiten(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(tensor)


def test_restoration_blends_inside_faces_only(small_astronaut):
    before = np.asarray(small_astronaut).astype(int)
    full, info, report = restore_faces(small_astronaut, _whiten, visibility=1.0)
    half, _, _ = restore_faces(small_astronaut, _whiten, visibility=0.5)
    none, _, _ = restore_faces(small_astronaut, _whiten, visibility=0.0)
    face = report.union
    full, half = np.asarray(full).astype(int), np.asarray(half).astype(int)
    assert np.array_equal(full[~face], before[~face]) and np.array_equal(half[~face], before[~face])
    core = feather(face, 4) == 1.0
    assert (full[core] == 255).all()
    assert np.abs(half[core] - (before[core] + 255) / 2).max() <= 1
    assert np.array_equal(np.asarray(none), before)
    assert info == {"Face restoration": "_whiten", "Face restoration visibility": "1"}


def _compact_state() -> dict[str, torch.Tensor]:
    """A tiny super-resolution network (not a face restorer) as spandrel sees it."""
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    return {k: v.contiguous() for k, v in SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict().items()}


def test_a_super_resolution_model_is_refused_as_face_restorer(tmp_path, monkeypatch, small_astronaut):
    from safetensors.torch import save_file

    save_file(_compact_state(), str(tmp_path / "2x-compact.safetensors"))
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(tmp_path))
    with pytest.raises(InvalidParameter, match="not face restoration"):
        restore_faces(small_astronaut, "2x-compact")
    with pytest.raises(ModelLoadError, match="missing weights file"):
        restore_faces(small_astronaut, tmp_path / "GFPGANv1.4.safetensors")  # an explicit Path, from Python


def test_restorer_names_never_leave_the_upscaler_folder(plugin_host, tmp_path, monkeypatch, small_astronaut):
    """Weights just outside the folder (and the folder as working directory, so a path
    relative to it would reach them) are refused, from Python and through the chain."""
    from safetensors.torch import save_file

    from aipaint.plugin.kit.folders import NameOutsideFolder

    folder = tmp_path / "upscalers"
    folder.mkdir()
    save_file(_compact_state(), str(tmp_path / "GFPGANv1.4.safetensors"))
    (folder / "link.safetensors").symlink_to(tmp_path / "GFPGANv1.4.safetensors")
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(folder))
    monkeypatch.chdir(folder)
    for name in ("../GFPGANv1.4", "../GFPGANv1.4.safetensors", str(tmp_path / "GFPGANv1.4.safetensors"), "link"):
        with pytest.raises(NameOutsideFolder):
            restore_faces(small_astronaut, name)
        with pytest.raises(NameOutsideFolder):
            run_postprocessors(small_astronaut, [("face-restore", {"restorer": name})], host=plugin_host)


def _tiny_restoreformer_state() -> dict[str, torch.Tensor]:
    """A real RestoreFormer (spandrel's class, random weights) reduced so that it restores a
    512-px face in about 2 s on one CPU thread: 32 channels (its GroupNorm needs 32), one
    residual block per level, a small codebook. spandrel reads every one of these sizes back
    from the weights; the six levels keep its 16-px attention resolution."""
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(0)
    model = RestoreFormer(n_embed=32, embed_dim=32, ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def restorer_folder(tmp_path_factory):
    """An upscaler folder holding a face restorer and a super-resolution model, as a user would have it."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("upscalers")
    save_file(_tiny_restoreformer_state(), str(folder / "RestoreFormer.safetensors"))
    save_file(_compact_state(), str(folder / "2x-compact.safetensors"))
    return folder


def test_restoreformer_weights_are_detected_as_a_face_restorer(restorer_folder, monkeypatch):
    from aipaint_plugins.facefix.fix import load_restorer
    from spandrel.architectures.RestoreFormer import RestoreFormer

    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(restorer_folder))
    model, name = load_restorer("RestoreFormer")
    assert name == "RestoreFormer" and model.purpose == "FaceSR" and model.scale == 1
    assert isinstance(model.descriptor.model, RestoreFormer)


def test_a_real_restorer_redraws_the_face_and_nothing_else(restorer_folder, monkeypatch, astronaut, tmp_path, capsys):
    """Load → detect → restore → blend on a photograph, from Python and from the command line."""
    from aipaint import __version__
    from aipaint.cli.main import main
    from aipaint.infotext import Infotext, read_png_parameters

    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(restorer_folder))
    before = np.asarray(astronaut)
    restored, info, report = restore_faces(astronaut, "RestoreFormer", visibility=1.0)
    after = np.asarray(restored)
    assert len(report.detections) == 1 and _iou(report.detections[0].box, ASTRONAUT_FACE) > 0.6
    face = report.union
    assert np.array_equal(after[~face], before[~face])  # outside the face mask: bit for bit
    core = feather(face, 4) == 1.0
    assert np.any(after != before, axis=2)[core].mean() > 0.9  # inside: the network's face
    assert info == {"Face restoration": "RestoreFormer", "Face restoration visibility": "1"}

    source, out = tmp_path / "astronaut.png", tmp_path / "restored.png"
    astronaut.save(source)
    assert main(["facefix", str(source), "--restore-only", "--restorer", "RestoreFormer", "--visibility", "0",
                 "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), before)  # strength 0: the photograph
    # No parameters in the photograph: an empty prompt line, then the parameters (A1111's layout).
    recorded = Infotext.from_text(read_png_parameters(out))
    assert recorded.prompt == "" and recorded.negative_prompt == ""
    assert recorded.params == {"Face restoration": "RestoreFormer", "Face restoration visibility": "0",
                               "Version": f"aipaint {__version__}"}
    capsys.readouterr()
    assert main(["facefix", str(out), "-o", str(tmp_path / "fixed.png")]) == 2  # the restored PNG carries no prompt
    assert "needs a prompt" in capsys.readouterr().err
    refused = tmp_path / "refused.png"
    assert main(["facefix", str(source), "--restore-only", "--restorer", "2x-compact", "-o", str(refused)]) == 2
    assert "not face restoration" in capsys.readouterr().err and not refused.exists()


@pytest.fixture()
def pickled_restorer(tmp_path, monkeypatch) -> str:
    """Weights only as a pickle. They are a super-resolution model, so *loading* them ends in
    "not face restoration": an UnsafeFileError instead proves the pickle was never opened."""
    torch.save(_compact_state(), tmp_path / "pickled.pth")
    monkeypatch.setenv("AIPAINT_UPSCALER_DIR", str(tmp_path))
    return "pickled"


@pytest.mark.parametrize("no", ["no", "false", "0"])
def test_allow_pickle_no_keeps_pickled_restorers_refused(plugin_host, pickled_restorer, small_astronaut, no):
    step = f"face-restore:restorer={pickled_restorer},allow_pickle={no}"
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        run_postprocessors(small_astronaut, [step], host=plugin_host)
    with pytest.raises(InvalidParameter, match="not face restoration"):  # yes: the pickle is read
        run_postprocessors(small_astronaut, [f"face-restore:restorer={pickled_restorer},allow_pickle=yes"], host=plugin_host)
    with pytest.raises(InvalidParameter, match="allow_pickle"):
        run_postprocessors(small_astronaut, [f"face-restore:restorer={pickled_restorer},allow_pickle=nope"], host=plugin_host)


@pytest.mark.parametrize("no", ["no", "0"])
def test_facefix_allow_pickle_no_keeps_pickled_restorers_refused(tiny_pipe, pickled_restorer, small_astronaut, no):
    _needs_inpaint(tiny_pipe)
    step = f"facefix:restorer={pickled_restorer},allow_pickle={no},prompt=a face,steps=2,inpaint_width=64,inpaint_height=64"
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        run_postprocessors(small_astronaut, [step], tiny_pipe)


def test_face_restore_post_processor_needs_weights(plugin_host, small_astronaut):
    with pytest.raises(InvalidParameter, match="restorer"):
        run_postprocessors(small_astronaut, ["face-restore"], host=plugin_host)


def test_facefix_command_detects_faces(tmp_path, astronaut, capsys):
    from aipaint.cli.main import main

    path = tmp_path / "astronaut.png"
    astronaut.save(path)
    assert main(["facefix", str(path), "--detect-only"]) == 0
    assert capsys.readouterr().out.startswith("face ")
