"""Face detectors. The default works offline with nothing to download: OpenCV's Haar
cascades ship inside ``opencv-python-headless`` 4.x.

A detector is any callable ``detector(image) -> list[Detection]``; pass one directly to
use YOLO, MediaPipe or anything else. By name: ``face_haar`` (frontal faces, the
default), ``face_haar_alt`` and ``profile_haar`` (other cascades), and ``yunet`` —
OpenCV's YuNet CNN, stronger, when its ONNX weights
(``face_detection_yunet_2023mar.onnx``) are in ``$AIPAINT_HOME/detectors``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import ModelLoadError, UnknownName

if TYPE_CHECKING:
    from PIL import Image

HAAR_CASCADES = {
    "face_haar": "haarcascade_frontalface_default.xml",
    "face_haar_alt": "haarcascade_frontalface_alt2.xml",
    "profile_haar": "haarcascade_profileface.xml",
}
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
DEFAULT_DETECTOR = "face_haar"


@dataclass(frozen=True)
class Detection:
    """A found face: its box ``(x0, y0, x1, y1)`` in pixels and a score in [0, 1]."""

    box: tuple[int, int, int, int]
    score: float
    label: str = "face"

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


Detector = Callable[["Image.Image"], list[Detection]]


def detector_dir() -> Path:
    home = Path(os.environ.get("AIPAINT_HOME") or Path.home() / ".aipaint").expanduser()
    return Path(os.environ.get("AIPAINT_DETECTOR_DIR") or home / "detectors").expanduser()


class HaarDetector:
    """Viola–Jones cascade. Its score is ``1 - exp(-n / 20)`` where ``n`` counts the
    overlapping raw detections merged into the box: a monotone confidence, 0.18 at 4
    neighbours (typical of a false hit), 0.86 at 40 (a clear frontal face), so ADetailer's
    default threshold of 0.3 keeps faces and drops most false hits."""

    def __init__(self, name: str, cascade_file: str, *, scale_factor: float = 1.1, min_neighbors: int = 3,
                 min_size_fraction: float = 0.03) -> None:
        import cv2

        self.name = name
        data = getattr(cv2, "data", None)
        path = Path(getattr(data, "haarcascades", "")) / cascade_file
        classifier = cv2.CascadeClassifier(str(path)) if hasattr(cv2, "CascadeClassifier") else None
        if classifier is None or classifier.empty():
            raise ModelLoadError(
                f"OpenCV's Haar cascade {cascade_file} is missing (opencv-python-headless 5.x ships none); "
                "install opencv-python-headless<5, or pass another detector"
            )
        self.classifier = classifier
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_size_fraction = min_size_fraction

    def __call__(self, image: Image.Image) -> list[Detection]:
        import cv2
        import numpy as np

        gray = cv2.equalizeHist(np.asarray(image.convert("L")))
        side = max(12, int(min(gray.shape) * self.min_size_fraction))
        boxes, neighbours = self.classifier.detectMultiScale2(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side)
        )
        found = [
            Detection((int(x), int(y), int(x + w), int(y + h)), 1.0 - math.exp(-float(n) / 20.0))
            for (x, y, w, h), n in zip(boxes, neighbours)
        ]
        return sorted(found, key=lambda d: -d.score)


class YuNetDetector:
    """OpenCV's YuNet face detector (a small CNN in ONNX; no pickle involved)."""

    def __init__(self, weights: Path, score_threshold: float = 0.3) -> None:
        import cv2

        if not weights.is_file():
            raise ModelLoadError(f"missing YuNet weights {weights}; download {YUNET_FILE} (OpenCV model zoo) there")
        self.name = "yunet"
        self._create = lambda size: cv2.FaceDetectorYN.create(str(weights), "", size, score_threshold)

    def __call__(self, image: Image.Image) -> list[Detection]:
        import cv2
        import numpy as np

        bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
        detector = self._create((bgr.shape[1], bgr.shape[0]))
        _, faces = detector.detect(bgr)
        found = []
        for row in faces if faces is not None else []:
            x, y, w, h = (int(round(v)) for v in row[:4])
            found.append(Detection((max(0, x), max(0, y), x + w, y + h), float(row[-1])))
        return sorted(found, key=lambda d: -d.score)


def detector_names() -> list[str]:
    names = list(HAAR_CASCADES)
    if (detector_dir() / YUNET_FILE).is_file():
        names.append("yunet")
    return names


def get_detector(detector: str | Detector | Any = DEFAULT_DETECTOR) -> Detector:
    """A detector by name, or the callable itself."""
    if callable(detector):
        return detector
    name = str(detector)
    if name in HAAR_CASCADES:
        return HaarDetector(name, HAAR_CASCADES[name])
    if name == "yunet":
        return YuNetDetector(detector_dir() / YUNET_FILE)
    raise UnknownName("face detector", name, detector_names() + ["yunet (needs weights)"] * ("yunet" not in detector_names()))


def detector_name(detector: Any) -> str:
    return str(getattr(detector, "name", None) or getattr(detector, "__name__", None) or type(detector).__name__)
