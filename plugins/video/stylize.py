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

Adapters work per frame as in any img2img request (LoRA tags in the prompt, ControlNet units,
DeepCache, …); a unit whose ``image`` is the string :data:`FRAME` (``"frame"``) is given each
input frame as its image, so ``--controlnet MODEL:frame:PREPROCESSOR`` guides every frame by its
own edges, depth or layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aipaint.errors import ImageError, InvalidParameter
from aipaint.imageutil import read_image_file

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline

FRAME = "frame"
"""An adapter unit's ``image`` that stands for the frame being painted (e.g. a ControlNet unit
guided by each frame's own edges): ``AdapterUnit("controlnet", {"model": …, "image": FRAME})``."""

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


@dataclass
class FrameSource:
    """Frames of a video file, animated GIF or image folder, read one at a time (a long video
    is never held in memory whole). ``fps`` and ``count`` (the frames that will be kept, when
    the container says; else None) are known before the first frame is read."""

    path: Path
    fps: float
    count: int | None
    frames: Iterator[Image.Image]

    def __iter__(self) -> Iterator[Image.Image]:
        return self.frames


def open_frames(path: str | Path, *, max_frames: int | None = None, every: int = 1) -> FrameSource:
    """Open a video file, an animated GIF or a folder of images (sorted by name) for reading.

    ``every`` keeps one frame in ``every`` (the frame rate is divided to match);
    ``max_frames`` stops after that many kept frames. Errors that the container shows at
    once (no such file, not a video, no frames) are raised here; a frame of another size
    than the first, when it is reached."""
    from PIL import Image, ImageSequence, UnidentifiedImageError

    if every < 1:
        raise InvalidParameter("every", every, "must be 1 or more (1 keeps every frame)")
    if max_frames is not None and max_frames < 1:
        raise InvalidParameter("max_frames", max_frames, "must be 1 or more")
    path = Path(path)
    if not path.exists():
        raise ImageError(f"no video, GIF or frame folder at {str(path)!r}")

    def kept(total: int | None) -> int | None:
        if total is None or total <= 0:  # the container does not say
            return None
        n = -(-total // every)
        return min(n, max_frames) if max_frames is not None else n

    def trimmed(frames: Iterable[Image.Image]) -> Iterator[Image.Image]:
        size = None
        taken = 0
        for index, frame in enumerate(frames):
            if max_frames is not None and taken >= max_frames:
                return
            if index % every:
                continue
            frame = frame.convert("RGB")
            if size is None:
                size = frame.size
            elif frame.size != size:
                raise ImageError(f"frame {index} of {str(path)!r} is {frame.size[0]}x{frame.size[1]}, not "
                                 f"{size[0]}x{size[1]} as the first: a clip's frames must share one size")
            taken += 1
            yield frame

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"{str(path)!r} has no frames to read (no {', '.join(IMAGE_SUFFIXES)} files)")

        def folder() -> Iterator[Image.Image]:
            for file in files:  # through the one reader that refuses decompression bombs
                yield read_image_file(file, "frame").convert("RGB")

        return FrameSource(path, DEFAULT_FPS / every, kept(len(files)), trimmed(folder()))
    if path.suffix.lower() == ".gif":
        try:
            with Image.open(path) as image:
                n = getattr(image, "n_frames", 1)
                durations = []
                for frame in ImageSequence.Iterator(image):
                    durations.append(frame.info.get("duration", 0) or 0)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise ImageError(f"cannot read GIF {str(path)!r}: {exc}") from exc
        mean_ms = float(np.mean(durations)) if durations else 0.0
        fps = 1000.0 / mean_ms if mean_ms > 0 else DEFAULT_FPS

        def gif() -> Iterator[Image.Image]:
            with Image.open(path) as image:
                for frame in ImageSequence.Iterator(image):
                    yield frame.convert("RGB")

        return FrameSource(path, fps / every, kept(n), trimmed(gif()))
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise ImageError(f"cannot read video {str(path)!r}: OpenCV could not open it")
    fps = float(capture.get(cv2.CAP_PROP_FPS)) or DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    ok, first = capture.read()
    if not ok:
        capture.release()
        raise ImageError(f"{str(path)!r} has no frames to read")

    def video() -> Iterator[Image.Image]:
        try:
            bgr = first
            while True:
                yield Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
                ok, bgr = capture.read()
                if not ok:
                    return
        finally:
            capture.release()

    return FrameSource(path, fps / every, kept(total), trimmed(video()))


def read_clip(path: str | Path, *, max_frames: int | None = None, every: int = 1) -> Clip:
    """All the frames of :func:`open_frames` in memory, as a :class:`Clip`."""
    source = open_frames(path, max_frames=max_frames, every=every)
    frames = list(source)
    if not frames:
        raise ImageError(f"{str(path)!r} has no frames to read")
    return Clip(frames, source.fps)


class FrameSink:
    """Writes frames one at a time as a video file (by suffix), an animated GIF, or — for a
    path without a suffix — a folder of numbered PNGs that keep each frame's parameters.
    Use as a context manager; the file is complete when it closes. A GIF is assembled at
    the close (Pillow writes it in one go)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self.count = 0
        self._writer: Any = None
        self._gif: list[Image.Image] = []
        self._size: tuple[int, int] | None = None
        suffix = self.path.suffix.lower()
        if suffix not in ("", ".gif") and suffix not in VIDEO_SUFFIXES:
            raise InvalidParameter("output", str(self.path), "write a video as .mp4, .mov, .mkv, .avi or .gif, "
                                   "or give a path without a suffix for a folder of PNG frames")
        self.suffix = suffix

    def __enter__(self) -> FrameSink:
        return self

    def write(self, frame: Image.Image, parameters: str | None = None) -> None:
        frame = frame.convert("RGB")
        if self._size is None:
            self._size = frame.size
            self._open()
        elif frame.size != self._size:
            frame = frame.resize(self._size)
        if self.suffix == "":
            from aipaint.api.result import save_png

            save_png(frame, self.path / f"frame-{self.count:05d}.png", parameters or None)
        elif self.suffix == ".gif":
            self._gif.append(frame)
        else:
            import cv2

            self._writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
        self.count += 1

    def _open(self) -> None:
        if self.suffix == "":
            self.path.mkdir(parents=True, exist_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.suffix in VIDEO_SUFFIXES:
            import cv2

            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*VIDEO_SUFFIXES[self.suffix]),
                                           self.fps, self._size)
            if not self._writer.isOpened():
                raise ImageError(f"OpenCV cannot write {self.suffix} here (no {VIDEO_SUFFIXES[self.suffix]} encoder); "
                                 "write a .gif or a frame folder instead")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._gif:
            first, *rest = self._gif
            first.save(self.path, save_all=True, append_images=rest, duration=max(1, round(1000.0 / self.fps)), loop=0)
            self._gif = []

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_clip(clip: Clip, path: str | Path) -> Path:
    """Write ``clip`` (see :class:`FrameSink` for the formats)."""
    if not clip.frames:
        raise InvalidParameter("clip", "no frames", "a clip to write needs at least one frame")
    texts = clip.infotexts or [None] * len(clip.frames)
    with FrameSink(path, clip.fps) as sink:
        for frame, text in zip(clip.frames, texts, strict=True):
            sink.write(frame, text)
    return Path(path)


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


def check_settings(denoising_strength: float, temporal: float) -> None:
    """The video settings' ranges (the CLI checks them before it loads a model)."""
    if not 0.0 <= temporal < 1.0:
        raise InvalidParameter("temporal", temporal, "must be at least 0 and below 1 (0: frames painted independently)")
    if not 0.0 < denoising_strength <= 1.0:
        raise InvalidParameter("denoising_strength", denoising_strength, "must be above 0 and at most 1")


@dataclass(frozen=True)
class StyledFrame:
    """One painted frame: the image, its A1111-style parameters, the seed that painted it."""

    image: Image.Image
    parameters: str
    seed: int


def stylize_frames(
    pipe: Pipeline,
    frames: Iterable[Image.Image],
    prompt: str,
    negative_prompt: str = "",
    *,
    denoising_strength: float = 0.5,
    temporal: float = 0.0,
    seed_step: int = 0,
    request: Any = None,
    total: int | None = None,
    **params: Any,
) -> Iterator[StyledFrame]:
    """Paint ``frames`` towards the prompt, one at a time, yielding each as it is done (a long
    video streams from :func:`open_frames` to a :class:`FrameSink` without being held whole).

    ``temporal`` (0 to <1): how much of each frame's starting image is the previous stylised
    frame, warped onto it along the input's optical flow. ``request``: a
    :class:`aipaint.api.request.GenerationRequest` to take every other setting from (the CLI's);
    ``params`` are its fields otherwise (``steps``, ``cfg_scale``, ``seed``, ``width``, …).
    One seed serves every frame (a random one when none is given); ``seed_step=1`` gives frame
    ``i`` the seed ``seed + i`` instead (a livelier, "boiling" look). ``total`` (the number of
    frames, when known) goes into each frame's ``Video frame: i/total`` entry."""
    from aipaint.api.request import GenerationRequest

    check_settings(denoising_strength, temporal)
    base = request if request is not None else GenerationRequest(prompt=prompt)
    given = {name: value for name, value in params.items() if value is not None}
    base = dataclasses.replace(base, prompt=prompt, negative_prompt=negative_prompt, **given)
    if base.batch_size != 1:
        raise InvalidParameter("batch_size", base.batch_size, "a video is painted one frame at a time: leave it at 1")
    base = dataclasses.replace(base, denoising_strength=denoising_strength).with_seed()
    return _paint(pipe, frames, base, temporal, seed_step, total)  # checked above, painted as iterated


def _paint(pipe: Pipeline, frames: Iterable[Image.Image], base: Any, temporal: float, seed_step: int,
           total: int | None) -> Iterator[StyledFrame]:
    from aipaint.api.request import MAX_SEED

    factor = pipe.model.vae_scale_factor
    previous_in: Image.Image | None = None
    previous_out: Image.Image | None = None
    for index, frame in enumerate(frames):
        if index == 0 and not (base.width and base.height):  # the clip's own size, on the model's grid
            width, height = frame.size
            base = dataclasses.replace(base, width=max(factor, width - width % factor),
                                       height=max(factor, height - height % factor))
        start = frame
        if temporal > 0 and previous_out is not None and previous_in is not None:
            carried = warp(previous_out.resize(frame.size), flow_between(previous_in, frame))
            start = blend(frame, carried, temporal)
        seed = (base.seed + index * seed_step) % (MAX_SEED + 1)
        request = dataclasses.replace(base, init_image=start, seed=seed, adapters=_frame_units(base.adapters, frame))
        result = pipe.generate(request)
        previous_in, previous_out = frame, result.images[0]
        yield StyledFrame(previous_out, _with_video_entries(result.infotexts[0], index, total, temporal, seed_step), seed)


def _frame_units(units: Sequence[Any], frame: Image.Image) -> tuple[Any, ...]:
    """``units`` with every ``image`` that is :data:`FRAME` replaced by ``frame``."""
    from aipaint.plugin.adapters import AdapterUnit

    return tuple(AdapterUnit(unit.kind, {**unit.options, "image": frame})
                 if isinstance(unit.options.get("image"), str) and unit.options["image"] == FRAME else unit
                 for unit in units)


def stylize_clip(
    pipe: Pipeline,
    clip: Clip,
    prompt: str,
    negative_prompt: str = "",
    *,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Clip:
    """:func:`stylize_frames` over a clip in memory; returns the stylised clip (same frame
    rate, each frame's parameters in ``infotexts``, the first frame's seed in ``seed``).
    ``progress(done, total)`` is called after each frame."""
    if not clip.frames:
        raise InvalidParameter("clip", "no frames", "a clip to stylise needs at least one frame")
    out: list[StyledFrame] = []
    for styled in stylize_frames(pipe, clip.frames, prompt, negative_prompt, total=len(clip.frames), **options):
        out.append(styled)
        if progress is not None:
            progress(len(out), len(clip.frames))
    return Clip([f.image for f in out], clip.fps, [f.parameters for f in out], out[0].seed)


def _with_video_entries(text: str, index: int, total: int | None, temporal: float, seed_step: int) -> str:
    from aipaint.infotext import Infotext

    info = Infotext.from_text(text)
    info.params["Video frame"] = f"{index + 1}/{total}" if total else str(index + 1)
    info.params["Video temporal"] = f"{temporal:g}"
    if seed_step:
        info.params["Video seed step"] = str(seed_step)
    return info.to_text()


def stylize_file(
    pipe: Pipeline,
    source: str | Path | FrameSource,
    output: str | Path,
    prompt: str,
    negative_prompt: str = "",
    *,
    max_frames: int | None = None,
    every: int = 1,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> tuple[Path, int, float, int]:
    """Stream ``source`` (a path, or a :class:`FrameSource` already opened, whose own trimming
    then holds) through :func:`stylize_frames` into ``output``, one frame in memory at a time
    (a GIF output is assembled at the end). Returns (output, frames, fps, seed).
    ``progress(done, total)``: ``total`` is the container's frame count, or 0 when it does not say."""
    frames = source if isinstance(source, FrameSource) else open_frames(source, max_frames=max_frames, every=every)
    sink = FrameSink(output, frames.fps)  # a bad output suffix fails before any painting
    seed = -1
    with sink:
        for styled in stylize_frames(pipe, frames, prompt, negative_prompt, total=frames.count, **options):
            sink.write(styled.image, styled.parameters)
            seed = styled.seed if sink.count == 1 else seed
            if progress is not None:
                progress(sink.count, frames.count or 0)
    if sink.count == 0:
        raise ImageError(f"{str(frames.path)!r} has no frames to read")
    return Path(output), sink.count, frames.fps, seed


__all__: Sequence[str] = ("FRAME", "Clip", "FrameSink", "FrameSource", "StyledFrame", "open_frames", "read_clip", "write_clip",
                          "stylize_frames", "stylize_clip", "stylize_file", "flow_between", "warp", "blend")
