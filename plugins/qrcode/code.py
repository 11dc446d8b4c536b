"""Making QR codes (always at error correction H, 30 % of the code may be lost) and
reading them back with real decoders.

Decoders: OpenCV's ``QRCodeDetector`` (always there) and ZXing (``zxing-cpp``) when
installed. A picture "decodes" when every chosen decoder reads exactly the payload from
it, shown at no less than :data:`MIN_VIEW` pixels (small images are enlarged by an
integer factor, as a screen would show them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aipaint.errors import AipaintError, InvalidParameter, UnknownName

if TYPE_CHECKING:
    from PIL import Image

MAX_VERSION = 40
MIN_MODULE_PX = 2.0
MIN_VIEW = 256
QUIET_ZONE = 4


class QRPayloadTooLong(InvalidParameter):
    """The payload does not fit the requested QR version, image size, or any QR code."""


class QRUnreadable(AipaintError):
    """No blend of code and art (up to the plain code) decoded to the payload."""


@dataclass(frozen=True)
class QRCode:
    """A QR code's modules (True = dark), quiet zone included, and where its fixed patterns lie."""

    payload: str
    version: int
    modules: np.ndarray  # bool, (n, n), n = 17 + 4 * version + 2 * border
    function: np.ndarray  # bool: finder/separator, timing and alignment modules, plus the quiet zone
    border: int = QUIET_ZONE

    @property
    def size(self) -> int:
        return int(self.modules.shape[0])

    def min_image_size(self) -> int:
        return int(np.ceil(self.size * MIN_MODULE_PX))

    def render(self, size: int) -> np.ndarray:
        """The code at ``size``×``size`` px: float (1 = white, 0 = dark)."""
        return _resize_cells(np.where(self.modules, 0.0, 1.0), size)

    def cell_map(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """For each pixel of a ``size``-px image: its module's index (row, col) and its
        position inside the module (0..1 along each axis), for module-aware blending."""
        coords = (np.arange(size) + 0.5) * self.size / size
        index = np.minimum(coords.astype(int), self.size - 1)
        return index, coords - index


def _resize_cells(cells: np.ndarray, size: int) -> np.ndarray:
    n = cells.shape[0]
    index = np.minimum(((np.arange(size) + 0.5) * n / size).astype(int), n - 1)
    return cells[np.ix_(index, index)]


def _function_patterns(version: int, border: int) -> np.ndarray:
    import qrcode.util

    n = 17 + 4 * version
    mask = np.zeros((n, n), dtype=bool)
    for r, c in ((0, 0), (0, n - 8), (n - 8, 0)):  # finders with their separators
        mask[max(r, 0) : r + 8, max(c, 0) : c + 8] = True
    mask[6, :] = True  # timing patterns
    mask[:, 6] = True
    centres = qrcode.util.pattern_position(version)
    for r in centres:
        for c in centres:
            if not mask[r, c]:
                mask[r - 2 : r + 3, c - 2 : c + 3] = True
    return np.pad(mask, border, constant_values=True)


def make_code(payload: str, *, version: int | None = None, border: int = QUIET_ZONE, image_size: int | None = None) -> QRCode:
    """Encode ``payload`` at error correction H, in the smallest version that fits (or ``version``).

    Raises :class:`QRPayloadTooLong` when it fits no code, not the given version, or not
    ``image_size`` at :data:`MIN_MODULE_PX` pixels per module.
    """
    import qrcode
    from qrcode.exceptions import DataOverflowError

    if not isinstance(payload, str) or not payload:
        raise InvalidParameter("payload", payload, "must be a non-empty string")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION):
        raise InvalidParameter("version", version, f"must be a whole number from 1 to {MAX_VERSION}")
    fitted = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_H, border=0)
    fitted.add_data(payload)
    try:
        fitted.make(fit=True)
    except (DataOverflowError, ValueError):
        raise QRPayloadTooLong(
            "payload", f"{len(payload.encode())} bytes",
            "is too long for any QR code at error correction H (at most 1273 bytes of text)",
            "shorten it, e.g. with a URL shortener",
        ) from None
    needed = fitted.version
    if version is not None and needed > version:
        raise QRPayloadTooLong(
            "payload", f"{len(payload.encode())} bytes", f"does not fit a version {version} code at error correction H",
            f"it needs version {needed}: pass version={needed} or more, or shorten the payload",
        )
    code = qrcode.QRCode(version=version or needed, error_correction=qrcode.constants.ERROR_CORRECT_H, border=border)
    code.add_data(payload)
    code.make(fit=False)
    result = QRCode(payload, code.version, np.array(code.get_matrix(), dtype=bool), _function_patterns(code.version, border), border)
    if image_size is not None and image_size < result.min_image_size():
        raise QRPayloadTooLong(
            "payload", f"{len(payload.encode())} bytes",
            f"needs a version {result.version} code of {result.size} modules (quiet zone included), which a "
            f"{image_size}-px image cannot hold at {MIN_MODULE_PX:g} px per module",
            f"use a size of at least {result.min_image_size()} px, or a shorter payload",
        )
    return result


# --- decoding -------------------------------------------------------------------------------


def _decode_opencv(gray: np.ndarray) -> str | None:
    import cv2

    text, _, _ = cv2.QRCodeDetector().detectAndDecode(gray)
    return text or None


def _decode_zxing(gray: np.ndarray) -> str | None:
    import zxingcpp

    for result in zxingcpp.read_barcodes(gray, formats=zxingcpp.BarcodeFormat.QRCode):
        if result.valid and result.text:
            return result.text
    return None


DECODERS = {"opencv": _decode_opencv, "zxing": _decode_zxing}


def available_decoders() -> tuple[str, ...]:
    names = ["opencv"]
    try:
        import zxingcpp  # noqa: F401

        names.append("zxing")
    except ImportError:
        pass
    return tuple(names)


def check_decoders(decoders: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    if decoders is None or decoders == "all":
        return available_decoders()
    names = (decoders,) if isinstance(decoders, str) else tuple(decoders)
    for name in names:
        if name not in DECODERS:
            raise UnknownName("QR decoder", name, list(DECODERS))
        if name not in available_decoders():
            raise InvalidParameter("decoders", name, "is not installed", "pip install zxing-cpp")
    if not names:
        raise InvalidParameter("decoders", decoders, "must name at least one decoder")
    return names


def decoder_view(image: Image.Image | np.ndarray) -> np.ndarray:
    """Grey uint8 view of the image, enlarged by an integer factor to at least :data:`MIN_VIEW` px."""
    import cv2

    array = np.asarray(image.convert("L")) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim == 3:
        array = cv2.cvtColor(array.astype(np.uint8), cv2.COLOR_RGB2GRAY)
    array = array.astype(np.uint8)
    factor = int(np.ceil(MIN_VIEW / max(1, min(array.shape[:2]))))
    if factor > 1:
        array = cv2.resize(array, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    return array


def decode(image: Image.Image | np.ndarray, decoders: tuple[str, ...] | None = None) -> dict[str, str | None]:
    """What each decoder reads from ``image`` (None where it reads nothing)."""
    view = decoder_view(image)
    return {name: DECODERS[name](view) for name in check_decoders(decoders)}


def decodes_to(image: Image.Image | np.ndarray, payload: str, decoders: tuple[str, ...] | None = None) -> bool:
    """True when every decoder reads exactly ``payload``."""
    view = decoder_view(image)
    return all(DECODERS[name](view) == payload for name in check_decoders(decoders))
