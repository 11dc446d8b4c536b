"""Frame-by-frame video stylisation: img2img on every frame, kept steady from frame to frame.

Each frame is painted by img2img at ``denoising_strength`` with **the same seed** (so the noise
does not change under a still picture), and, with ``temporal`` > 0, starts from a blend of the
frame and the *previous stylised frame warped onto it* along the optical flow of the input
(OpenCV's Farnebäck flow), so what was painted on a moving object moves with it instead of
being painted anew. ``temporal=0`` (the default) is plain batch img2img with a fixed seed.
Measured on the embedded model (``benchmarks/video_flicker.py``): the fixed seed is what keeps
frames steady; the temporal blend does not help there (with one seed it adds flicker, as the
flow of noisy 32-pixel frames moves the noise), and it is unmeasured on real models.

Frames are read from and written to a video file (whatever OpenCV's FFmpeg reads; written
as ``.mp4`` (mp4v), ``.avi`` (MJPG), ``.mov`` or ``.mkv``), an animated GIF, or a folder of
images (written as numbered PNGs, each with its A1111-style parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aipaint.errors import ImageError, InvalidParameter

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline

VIDEO_SUFFIXES = {".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_FPS = 12.0


@dataclass
class Clip:
    """Frames (RGB PIL images, one size) and their frame rate; a stylised clip also has each
    frame's A1111-style parameters and the seed that painted every frame."""

    frames: list[Image.Image]
    fps: float = DEFAULT_FPS
    infotexts: list[str] = field(default_factory=list)
    seed: int | None = None


def read_clip(path: str | Path, *, max_frames: int | None = None, every: int = 1) -> Clip:
    """Read a video file, an animated GIF or a folder of images (sorted by name).

    ``every`` keeps one frame in ``every`` (the frame rate is divided to match);
    ``max_frames`` stops after that many kept frames."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if every < 1:
        raise InvalidParameter("every", every, "must be 1 or more (1 keeps every frame)")
    if max_frames is not None and max_frames < 1:
        raise InvalidParameter("max_frames", max_frames, "must be 1 or more")
    path = Path(path)
    if not path.exists():
        raise ImageError(f"no video, GIF or frame folder at {str(path)!r}")
    frames: list[Image.Image] = []
    fps = DEFAULT_FPS

    def keep(index: int) -> bool:
        return index % every == 0 and (max_frames is None or len(frames) < max_frames)

    def full() -> bool:
        return max_frames is not None and len(frames) >= max_frames

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for index, file in enumerate(files):
            if full():
                break
            if keep(index):
                try:
                    with Image.open(file) as image:
                        frames.append(image.convert("RGB"))
                except (OSError, UnidentifiedImageError) as exc:
                    raise ImageError(f"cannot read frame {str(file)!r}: {exc}") from exc
    elif path.suffix.lower() == ".gif":
        try:
            with Image.open(path) as image:
                durations = []
                for index, frame in enumerate(ImageSequence.Iterator(image)):
                    if full():
                        break
                    durations.append(frame.info.get("duration", 0) or 0)
                    if keep(index):
                        frames.append(frame.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageError(f"cannot read GIF {str(path)!r}: {exc}") from exc
        mean_ms = float(np.mean(durations)) if durations else 0.0
        fps = 1000.0 / mean_ms if mean_ms > 0 else DEFAULT_FPS
    else:
        import cv2

        capture = cv2.VideoCapture(str(path))
        try:
            if not capture.isOpened():
                raise ImageError(f"cannot read video {str(path)!r}: OpenCV could not open it")
            fps = float(capture.get(cv2.CAP_PROP_FPS)) or DEFAULT_FPS
            index = 0
            while not full():
                ok, bgr = capture.read()
                if not ok:
                    break
                if keep(index):
                    frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                index += 1
        finally:
            capture.release()
    if not frames:
        raise ImageError(f"{str(path)!r} has no frames to read")
    if len({f.size for f in frames}) > 1:
        raise ImageError(f"the frames of {str(path)!r} differ in size; a clip's frames must share one size")
    return Clip(frames, fps / every)


def write_clip(clip: Clip, path: str | Path) -> Path:
    """Write ``clip`` as a video file (by suffix), an animated GIF, or — for a path without a
    suffix — a folder of numbered PNGs that keep each frame's parameters."""
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if not clip.frames:
        raise InvalidParameter("clip", "no frames", "a clip to write needs at least one frame")
    if suffix == "":
        from aipaint.result import save_png

        path.mkdir(parents=True, exist_ok=True)
        texts = clip.infotexts or [""] * len(clip.frames)
        for index, (frame, text) in enumerate(zip(clip.frames, texts, strict=True)):
            save_png(frame, path / f"frame-{index:05d}.png", text or None)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        duration = max(1, round(1000.0 / clip.fps))
        first, *rest = clip.frames
        first.save(path, save_all=True, append_images=rest, duration=duration, loop=0)
        return path
    if suffix not in VIDEO_SUFFIXES:
        raise InvalidParameter("output", str(path), "write a video as .mp4, .mov, .mkv, .avi or .gif, "
                               "or give a path without a suffix for a folder of PNG frames")
    import cv2

    width, height = clip.frames[0].size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*VIDEO_SUFFIXES[suffix]), clip.fps, (width, height))
    try:
        if not writer.isOpened():
            raise ImageError(f"OpenCV cannot write {suffix} here (no {VIDEO_SUFFIXES[suffix]} encoder); "
                             "write a .gif or a frame folder instead")
        for frame in clip.frames:
            writer.write(cv2.cvtColor(np.asarray(frame.convert("RGB").resize((width, height))), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path


def flow_between(previous: Image.Image, current: Image.Image) -> np.ndarray:
    """Dense optical flow (H, W, 2) that maps each pixel of ``current`` to where it was in
    ``previous`` (Farnebäck, on grey levels): ``warp(previous_image, flow)`` lines it up with ``current``."""
    import cv2

    a = cv2.cvtColor(np.asarray(current.convert("RGB")), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.asarray(previous.convert("RGB")), cv2.COLOR_RGB2GRAY)
    size = min(a.shape)
    window = max(5, (size // 8) | 1)
    return cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=window, iterations=3,
                                        poly_n=5, poly_sigma=1.1, flags=0)


def warp(image: Image.Image, flow: np.ndarray) -> Image.Image:
    """``image`` resampled along ``flow`` (as from :func:`flow_between`), edges replicated."""
    import cv2
    from PIL import Image

    h, w = flow.shape[:2]
    pixels = np.asarray(image.convert("RGB").resize((w, h)))
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    moved = cv2.remap(pixels, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_REPLICATE)
    return Image.fromarray(moved)


def blend(a: Image.Image, b: Image.Image, weight_b: float) -> Image.Image:
    from PIL import Image

    mixed = np.asarray(a, dtype=np.float32) * (1 - weight_b) + np.asarray(b.resize(a.size), dtype=np.float32) * weight_b
    return Image.fromarray(np.clip(np.round(mixed), 0, 255).astype(np.uint8))


def stylize_clip(
    pipe: Pipeline,
    clip: Clip,
    prompt: str,
    negative_prompt: str = "",
    *,
    denoising_strength: float = 0.5,
    temporal: float = 0.0,
    seed_step: int = 0,
    request: Any = None,
    progress: Callable[[int, int], None] | None = None,
    **params: Any,
) -> Clip:
    """Paint every frame of ``clip`` towards the prompt; returns the stylised clip (same frame
    rate, each frame's A1111-style parameters in ``infotexts``).

    ``temporal`` (0 to <1): how much of each frame's starting image is the previous stylised
    frame, warped onto it along the input's optical flow. ``request``: a
    :class:`aipaint.params.GenerationRequest` to take every other setting from (the CLI's);
    ``params`` are its fields otherwise (``steps``, ``cfg_scale``, ``seed``, ``width``, …).
    One seed serves every frame (a random one when none is given); ``seed_step=1`` gives frame
    ``i`` the seed ``seed + i`` instead (a livelier, "boiling" look; ``temporal`` then keeps it
    from flickering). ``progress(done, total)`` is called after each frame."""
    from aipaint.params import MAX_SEED, GenerationRequest

    if not 0.0 <= temporal < 1.0:
        raise InvalidParameter("temporal", temporal, "must be at least 0 and below 1 (0: frames painted independently)")
    if not 0.0 < denoising_strength <= 1.0:
        raise InvalidParameter("denoising_strength", denoising_strength, "must be above 0 and at most 1")
    frames = list(clip.frames)
    if not frames:
        raise InvalidParameter("clip", "no frames", "a clip to stylise needs at least one frame")
    factor = pipe.model.vae_scale_factor
    width, height = frames[0].size
    base = request if request is not None else GenerationRequest(prompt=prompt)
    given = {name: value for name, value in params.items() if value is not None}
    base = dataclasses.replace(base, prompt=prompt, negative_prompt=negative_prompt, **given)
    if base.batch_size != 1:
        raise InvalidParameter("batch_size", base.batch_size, "a video is painted one frame at a time: leave it at 1")
    size = {} if base.width and base.height else {"width": max(factor, width - width % factor),
                                                  "height": max(factor, height - height % factor)}
    base = dataclasses.replace(base, denoising_strength=denoising_strength, **size).with_seed()
    out: list[Image.Image] = []
    texts: list[str] = []
    previous_in: Image.Image | None = None
    for index, frame in enumerate(frames):
        start = frame
        if temporal > 0 and out and previous_in is not None:
            carried = warp(out[-1].resize(frame.size), flow_between(previous_in, frame))
            start = blend(frame, carried, temporal)
        seed = (base.seed + index * seed_step) % (MAX_SEED + 1)
        result = pipe.generate(dataclasses.replace(base, init_image=start, seed=seed))
        out.append(result.images[0])
        texts.append(_with_video_entries(result.infotexts[0], index, len(frames), temporal, seed_step))
        previous_in = frame
        if progress is not None:
            progress(index + 1, len(frames))
    return Clip(out, clip.fps, texts, base.seed)


def _with_video_entries(text: str, index: int, total: int, temporal: float, seed_step: int) -> str:
    from aipaint.infotext import Infotext

    info = Infotext.from_text(text)
    info.params["Video frame"] = f"{index + 1}/{total}"
    info.params["Video temporal"] = f"{temporal:g}"
    if seed_step:
        info.params["Video seed step"] = str(seed_step)
    return info.to_text()


def stylize_file(pipe: Pipeline, source: str | Path, output: str | Path, prompt: str, negative_prompt: str = "", *,
                 max_frames: int | None = None, every: int = 1, **options: Any) -> Path:
    """Read ``source``, stylise it (:func:`stylize_clip` ``options``) and write ``output``."""
    clip = read_clip(source, max_frames=max_frames, every=every)
    return write_clip(stylize_clip(pipe, clip, prompt, negative_prompt, **options), output)


def frames_of(images: Iterable[Image.Image], fps: float = DEFAULT_FPS) -> Clip:
    """A clip from images already in memory."""
    frames = [image.convert("RGB") for image in images]
    return Clip(frames, fps)


__all__: Sequence[str] = ("Clip", "read_clip", "write_clip", "stylize_clip", "stylize_file", "frames_of",
                          "flow_between", "warp")
