"""Frame-by-frame video stylisation (plugin ``video``): clip I/O, optical-flow warping, and
what the embedded model does with a clip."""

from __future__ import annotations

import numpy as np
import pytest
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import Scene, SceneObject
from aipaint_plugins.video.stylize import Clip, blend, flow_between, read_clip, stylize_clip, warp, write_clip
from PIL import Image

from aipaint.errors import ImageError, InvalidParameter


@pytest.fixture(scope="module")
def embedded_pipe():
    import aipaint

    return aipaint.load()


def circle_at(cx: float, colour: str = "red") -> Image.Image:
    return render(Scene("white", (SceneObject("circle", colour, "big", "left", cx=cx, cy=16.0, extent=13.0),)))


def flicker(frames) -> float:
    return float(np.mean([np.abs(np.asarray(b, np.float32) - np.asarray(a, np.float32)).mean()
                          for a, b in zip(frames, frames[1:])]))


def foreground_cx(image: Image.Image) -> float:
    a = np.asarray(image, np.float32)
    ys, xs = np.nonzero(np.linalg.norm(a - 255, axis=2) > 80)
    return float(xs.mean())


def test_flow_lines_a_moved_picture_up_with_the_next_frame():
    before, after = circle_at(10), circle_at(14)
    flow = flow_between(before, after)
    inside = np.linalg.norm(np.asarray(after, np.float32) - 255, axis=2) > 80
    assert -5 < flow[..., 0][inside].mean() < -3  # each pixel of the new frame came from 4 px to its left
    moved = warp(before, flow)
    def error(image: Image.Image) -> float:
        return float(np.abs(np.asarray(image, np.float32) - np.asarray(after, np.float32)).mean())

    assert error(moved) < 0.3 * error(before)


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ""])
def test_clips_round_trip_through_gif_video_and_frame_folders(tmp_path, suffix):
    frames = [circle_at(8 + 4 * i) for i in range(5)]
    texts = [f"frame {i}\nSteps: 1, Seed: {i}" for i in range(5)]
    path = write_clip(Clip(frames, 10, texts), tmp_path / f"clip{suffix}")
    back = read_clip(path)
    assert len(back.frames) == 5 and back.frames[0].size == (32, 32)
    if suffix:  # a frame folder has no frame rate of its own
        assert back.fps == pytest.approx(10, rel=0.05)
    lossy = 12 if suffix == ".mp4" else 1  # mp4v is lossy; GIF's palette holds these few colours
    assert all(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < lossy
               for a, b in zip(frames, back.frames))
    if suffix == "":
        from aipaint.infotext import read_png_parameters

        assert read_png_parameters(path / "frame-00003.png") == texts[3]
    assert [foreground_cx(f) for f in read_clip(path, every=2).frames] == pytest.approx(
        [foreground_cx(f) for f in frames[::2]], abs=1)
    assert len(read_clip(path, max_frames=2).frames) == 2


def test_bad_clips_and_outputs_say_what_is_wrong(tmp_path):
    with pytest.raises(ImageError, match="no video, GIF or frame folder"):
        read_clip(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no frames"):
        read_clip(tmp_path / "empty")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ImageError, match="junk.mp4"):
        read_clip(tmp_path / "junk.mp4")
    with pytest.raises(InvalidParameter, match=r"\.mp4, \.mov"):
        write_clip(Clip([circle_at(8)]), tmp_path / "out.xyz")
    with pytest.raises(InvalidParameter, match="every"):
        read_clip(tmp_path / "empty", every=0)


def test_one_seed_for_every_frame_keeps_a_still_shot_steady(embedded_pipe):
    """The usual flicker of batch img2img comes from a new seed per frame: a still shot with
    camera noise comes out nearly frame-identical with one seed, not with seed + i."""
    rng = np.random.default_rng(0)
    still = np.asarray(circle_at(16, "green"), np.float32)
    frames = [Image.fromarray(np.clip(still + rng.normal(0, 12, still.shape), 0, 255).astype(np.uint8)) for _ in range(5)]
    prompt = "a big green circle in the center, on a white background"
    steady = stylize_clip(embedded_pipe, Clip(frames), prompt, denoising_strength=0.5, seed=3)
    boiling = stylize_clip(embedded_pipe, Clip(frames), prompt, denoising_strength=0.5, seed=3, seed_step=1)
    assert flicker(steady.frames) < 1.0 < 3.0 < flicker(boiling.frames)
    assert flicker(steady.frames) < 0.2 * flicker(frames)  # steadier than the footage itself
    assert steady.seed == 3 and "Video frame: 5/5" in steady.infotexts[-1] and "Seed: 3," in steady.infotexts[-1]
    assert "Seed: 7," in boiling.infotexts[-1] and "Video seed step: 1" in boiling.infotexts[-1]


def test_stylised_frames_take_the_prompt_and_keep_the_motion(embedded_pipe):
    """At strength 0.5 each frame takes the prompt's colour and keeps its circle where the footage
    has it (at 0.1 the embedded model keeps the input's red; from 0.7 it starts to draw the circle
    in the prompt's default place, the center)."""
    frames = [circle_at(cx) for cx in (8, 13, 19, 24)]  # a red circle crossing the picture
    out = stylize_clip(embedded_pipe, Clip(frames), "a big blue circle on a white background",
                       denoising_strength=0.5, seed=1).frames
    from aipaint_plugins.shapes_world.evaluate import read_scene

    readings = [read_scene(f).objects for f in out]
    assert all(len(r) == 1 and r[0].colour != "red" and r[0].shape == "circle" for r in readings)
    xs = [r[0].cx for r in readings]
    assert xs == sorted(xs) and xs[0] < 14 and xs[-1] > 18  # the circle still crosses the picture


def test_temporal_starts_each_frame_from_the_previous_result_warped_onto_it(embedded_pipe, monkeypatch):
    starts = []
    generate = embedded_pipe.generate

    def spy(request, **kwargs):
        starts.append(request.init_image)
        return generate(request, **kwargs)

    monkeypatch.setattr(embedded_pipe, "generate", spy)
    frames = [circle_at(10), circle_at(14)]
    out = stylize_clip(embedded_pipe, Clip(frames), "a big red circle on the left, on a white background",
                       denoising_strength=0.3, temporal=0.5, seed=2, steps=4).frames
    assert np.array_equal(np.asarray(starts[0]), np.asarray(frames[0]))
    expected = blend(frames[1], warp(out[0], flow_between(frames[0], frames[1])), 0.5)
    assert np.array_equal(np.asarray(starts[1]), np.asarray(expected))
    with pytest.raises(InvalidParameter, match="temporal"):
        stylize_clip(embedded_pipe, Clip(frames), "x", temporal=1.0)
    from aipaint_plugins.video.stylize import stylize_frames

    with pytest.raises(InvalidParameter, match="denoising_strength"):  # when called, not when first iterated
        stylize_frames(embedded_pipe, frames, "x", denoising_strength=0)


def test_video_command(tmp_path, capsys):
    from aipaint.cli.main import main

    source = write_clip(Clip([circle_at(8 + 2 * i) for i in range(6)], 10), tmp_path / "in.gif")
    assert main(["video", str(source), "a big blue circle on a white background", "--steps", "4", "--seed", "9",
                 "--every", "2", "--no-progress"]) == 0
    out = capsys.readouterr()
    written = tmp_path / "in-styled.gif"
    assert out.out.strip() == str(written) and "3 frames at 5 fps, seed 9" in out.err
    assert len(read_clip(written).frames) == 3
    assert main(["video", str(tmp_path / "nope.mp4"), "x"]) == 2
    assert "no video, GIF or frame folder" in capsys.readouterr().err
    assert main(["video", str(source), "x", "--temporal", "1", "-o", str(tmp_path / "o.gif")]) == 2
    assert "temporal" in capsys.readouterr().err


def test_a_file_streams_through_frame_by_frame(embedded_pipe, tmp_path, monkeypatch):
    """stylize_file holds one input frame at a time: frames are read only as they are painted."""
    from aipaint_plugins.video import stylize

    source = write_clip(Clip([circle_at(8 + 3 * i) for i in range(4)], 10), tmp_path / "in.mp4")
    opened = stylize.open_frames(source)
    assert opened.count == 4 and opened.fps == pytest.approx(10)
    read, painted = [], []
    generate = embedded_pipe.generate

    def spy(request, **kwargs):
        painted.append(len(read))
        return generate(request, **kwargs)

    frames = opened.frames

    def counting():
        for frame in frames:
            read.append(frame)
            yield frame

    opened.frames = counting()
    monkeypatch.setattr(embedded_pipe, "generate", spy)
    path, count, fps, seed = stylize.stylize_file(embedded_pipe, opened, tmp_path / "out", "a big red circle on a white background",
                                                  seed=4, steps=4)
    assert painted == [1, 2, 3, 4]  # frame i was painted before frame i+1 was read
    assert (count, seed) == (4, 4) and sorted(p.name for p in path.iterdir())[-1] == "frame-00003.png"
    from aipaint.infotext import read_png_parameters

    assert "Video frame: 4/4" in read_png_parameters(path / "frame-00003.png")
    with pytest.raises(InvalidParameter, match=r"\.mp4, \.mov"):
        stylize.stylize_file(embedded_pipe, source, tmp_path / "out.xyz", "x")


def test_plugin_generation_options_reach_the_video_command():
    """``aipaint video`` is a generation command: the options plugins add to ``generate``
    (LoRA folder, ControlNet, DeepCache, ToMe, textual inversion) are its options too."""
    import argparse

    from aipaint.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    video = {opt for action in sub.choices["video"]._actions for opt in action.option_strings}
    assert {"--lora-dir", "--controlnet", "--control-image", "--deepcache", "--tome"} <= video
    assert sub.choices["video"].get_default("adapter_unit_builders")  # and they are turned into units


def test_a_controlnet_unit_on_the_frame_guides_each_frame_by_its_own_layout(embedded_pipe):
    """A ControlNet unit whose image is ``FRAME`` gets each input frame: at full denoising
    strength (nothing of the frame is kept) the layout ControlNet still puts the object where
    each frame has it, where one seed alone paints the same picture every time."""
    from aipaint_plugins.shapes_world.evaluate import read_scene
    from aipaint_plugins.video.stylize import FRAME

    from aipaint.plugin.adapters import AdapterUnit

    frames = [circle_at(cx) for cx in (8, 24, 8, 24)]  # left, right, left, right
    prompt = "a big red circle, on a white background"  # no position: the frames must give it
    unit = AdapterUnit("controlnet", {"model": "shapes-tiny-controlnet-layout", "image": FRAME, "preprocessor": "canny"})
    guided = stylize_clip(embedded_pipe, Clip(frames), prompt, denoising_strength=1.0, seed=4, steps=10,
                          adapters=(unit,))
    plain = stylize_clip(embedded_pipe, Clip(frames), prompt, denoising_strength=1.0, seed=4, steps=10)
    sides = ["left" if foreground_cx(f) < 16 else "right" for f in guided.frames]
    assert sides == ["left", "right", "left", "right"], [foreground_cx(f) for f in guided.frames]
    assert flicker(plain.frames) < 1.0  # one seed, nothing of the frames kept: the same picture each time
    assert all(len(read_scene(f).objects) == 1 for f in guided.frames)
    assert "ControlNet 0:" in guided.infotexts[0] and "shapes-tiny-controlnet-layout" in guided.infotexts[0]


def test_video_command_takes_a_controlnet_on_the_frame(tmp_path, capsys):
    from aipaint.cli.main import main
    from aipaint.infotext import Infotext, read_png_parameters

    source = write_clip(Clip([circle_at(cx) for cx in (8, 24)], 4), tmp_path / "in.gif")
    out = tmp_path / "frames"
    assert main(["video", str(source), "a big red circle, on a white background", "-s", "1", "--steps", "10",
                 "--seed", "4", "--controlnet", "shapes-tiny-controlnet-layout:frame:canny", "-o", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    pngs = sorted(out.glob("*.png"))
    assert [foreground_cx(Image.open(p).convert("RGB")) < 16 for p in pngs] == [True, False]
    assert "shapes-tiny-controlnet-layout" in Infotext.from_text(read_png_parameters(pngs[1])).to_text()
