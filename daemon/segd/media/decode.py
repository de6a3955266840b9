"""Turn one image file into the network's input: a (size, size, 3) uint8 RGB array.

What the bytes are and what their header says is read by `formats` and `headers`; the file itself
by `reader`. Design notes (measured against opencv-python-headless 5.0.0):

* The file is read once into memory and decoded with ``cv2.imdecode``; OpenCV releases the GIL
  while decoding, so callers get real parallelism from a thread pool. This module sets no global
  OpenCV configuration (threads, log level): that is the caller's business.
* The format is detected from magic bytes, never from the suffix, and the image dimensions are read
  from the header (``probe_size``) before anything is decoded, so a decompression bomb costs a few
  hundred bytes of parsing rather than gigabytes of memory.
* Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (``IMREAD_REDUCED_COLOR_*``),
  the largest reduction that keeps the shorter side >= the target size.
* EXIF orientation: in OpenCV 5.0 ``imdecode`` applies it for JPEG, PNG and WebP with the colour
  modes but *not* with ``IMREAD_UNCHANGED`` (which we need for alpha and 16-bit), and it always
  applies the TIFF Orientation tag, even with ``IMREAD_IGNORE_ORIENTATION``. We therefore
  decode JPEG/PNG/WebP/GIF/BMP/AVIF with orientation ignored and apply the EXIF orientation
  ourselves on the small output (cheaper than rotating a full-size image), leave TIFF to
  OpenCV, and leave HEIF to libheif, which applies the container's rotation (irot/imir) itself.
* Truncation: OpenCV 5.0 returns None for a JPEG cut short anywhere (it no longer returns a
  partially grey image), but we check for the EOI marker / IEND chunk first anyway so that a file
  still being copied is reported as *truncated*, whatever the decoder's leniency, and so that the
  decoder's own error chatter on stderr is mostly avoided.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from segd.core.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from segd.media.formats import describe_non_image, recognise_unsupported, sniff
from segd.media.headers import (
    CHECKED_BEFORE_DECODING,
    TRUNCATION_REASON,
    exif_orientation,
    looks_truncated,
    probe_size,
)
from segd.media.reader import read_regular_file

__all__ = [
    "HEIF_MISSING_REASON",
    "DecodeOptions",
    "decode_bytes",
    "decode_file",
    "heif_available",
    "read_image_file",
]

HEIF_MISSING_REASON = "HEIC/HEIF needs the optional extra: pip install 'segd[heif]'"

# An uncompressed 16-bit RGBA pixel is 8 bytes: no legitimate compressed file of an image within
# max_pixels is larger than that, plus slack for metadata (or a motion-photo video appended).
_BYTES_PER_PIXEL_CAP = 8
_FILE_SLACK = 64 * 1024 * 1024


@dataclass(frozen=True)
class DecodeOptions:
    """How to turn a file into network input."""

    size: int = 160
    """Side of the square output (the network's input size)."""
    resize: Literal["crop", "squash"] = "crop"
    """crop: shorter side to `size`, then centre crop; squash: resize to size x size."""
    max_pixels: int = 100_000_000
    """Decompression-bomb guard: width * height from the header must not exceed this."""
    reduced_decode: bool = True
    """Decode large JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain (off only for benchmarks)."""

    def __post_init__(self) -> None:
        # A bad option is a programming error, not a bad file: ValueError, not ImageError.
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.resize not in ("crop", "squash"):
            raise ValueError(f"resize must be 'crop' or 'squash', got {self.resize!r}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")

    @property
    def max_file_bytes(self) -> int:
        """The largest file worth reading for an image of at most max_pixels."""
        return self.max_pixels * _BYTES_PER_PIXEL_CAP + _FILE_SLACK


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def decode_file(path: str | os.PathLike[str], opts: DecodeOptions) -> np.ndarray:
    """Return uint8 RGB array of shape (size, size, 3), C-contiguous.

    Raise an ImageError subclass naming the file on any failure.
    """
    data, _ = read_image_file(path, opts)
    return decode_bytes(data, opts, name=os.fspath(path))


def read_image_file(path: str | os.PathLike[str], opts: DecodeOptions, *,
                    follow_symlinks: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file and the stat they were read under (FileAccessError if
    it is anything else). The daemon passes follow_symlinks=False: a symlink in the inbox
    must never make it read a file outside its folders."""
    return read_regular_file(path, opts.max_file_bytes, follow_symlinks=follow_symlinks)


def decode_bytes(data: bytes, opts: DecodeOptions, name: str = "<bytes>") -> np.ndarray:
    """Decode an in-memory image file; see decode_file. `name` is used in error messages."""
    if not data:
        raise EmptyFileError(name, "file is empty (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        what = recognise_unsupported(data)
        if what is not None:
            raise UnsupportedFormatError(name, f"{what} files are not supported")
        raise NotAnImageError(name, describe_non_image(data))
    if fmt == "heif" and not heif_available():
        raise UnsupportedFormatError(name, HEIF_MISSING_REASON)

    probed = probe_size(data)
    if probed is not None:
        _, width, height = probed
        _check_pixels(name, width, height, opts)
    elif fmt == "heif":
        # Our 'ispe' walk is deliberately minimal; libheif parses the full container and
        # _decode_heif checks its header size before decoding any pixels.
        width = height = 0
    elif looks_truncated(fmt, data):
        raise TruncatedImageError(name, f"{fmt.upper()} header is cut short")
    else:
        raise CorruptImageError(name, f"unreadable {fmt.upper()} header")
    if fmt in CHECKED_BEFORE_DECODING and looks_truncated(fmt, data):
        raise TruncatedImageError(name, TRUNCATION_REASON[fmt])

    try:
        if fmt == "heif":
            img = _decode_heif(data, name, opts)
        else:
            img = _decode_cv2(data, fmt, width, height, opts)
        if img is None:
            if looks_truncated(fmt, data):
                raise TruncatedImageError(name, TRUNCATION_REASON.get(fmt, "file is cut short"))
            raise CorruptImageError(name, f"{fmt.upper()} decoder rejected the data")
        out = _fit(_to_bgr8(img, name), opts)
        if fmt not in ("tiff", "heif"):  # those two arrive already oriented, see module notes
            out = _apply_orientation(out, exif_orientation(fmt, data))
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    except ImageError:
        raise
    except cv2.error as exc:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
            raise ImageTooLargeError(name, "exceeds OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS") from exc
        raise CorruptImageError(name, f"decoder error: {_first_line(exc)}") from exc
    except MemoryError as exc:
        raise ImageTooLargeError(name, "not enough memory to decode") from exc
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        # Not expected from OpenCV or numpy here, but one odd file must never take the caller
        # down with an untyped error: report it as corrupt, with the cause chained.
        raise CorruptImageError(name, f"decoder failure: {type(exc).__name__}: {exc}") from exc
    return np.ascontiguousarray(out, dtype=np.uint8)


def heif_available() -> bool:
    """Whether the optional pillow-heif package can be imported (imported lazily, on demand)."""
    try:
        import pillow_heif  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but its libheif cannot be loaded
        return False
    return True


def _check_pixels(name: str, width: int, height: int, opts: DecodeOptions) -> None:
    if width * height > opts.max_pixels:
        raise ImageTooLargeError(
            name, f"{width}x{height} = {width * height} pixels exceeds max_pixels={opts.max_pixels}"
        )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
            (2, cv2.IMREAD_REDUCED_COLOR_2))  # fmt: skip


def _jpeg_flag(width: int, height: int, opts: DecodeOptions) -> int:
    """Largest DCT-domain reduction that keeps the shorter side >= opts.size."""
    if opts.reduced_decode:
        short = min(width, height)
        for factor, flag in _REDUCED:
            if -(-short // factor) >= opts.size:  # libjpeg rounds scaled sizes up
                return flag | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def _decode_cv2(
    data: bytes, fmt: str, width: int, height: int, opts: DecodeOptions
) -> np.ndarray | None:
    buf = np.frombuffer(data, dtype=np.uint8)
    if fmt == "jpeg":
        flag = _jpeg_flag(width, height, opts)
    else:
        # UNCHANGED keeps alpha and 16-bit samples, which we then convert properly ourselves.
        flag = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(buf, flag)
    return None if img is None or img.size == 0 else img


def _decode_heif(data: bytes, name: str, opts: DecodeOptions) -> np.ndarray:
    import pillow_heif  # lazy: optional dependency, checked by heif_available() before

    try:
        heif = pillow_heif.open_heif(data, convert_hdr_to_8bit=True, bgr_mode=True)
        width, height = heif.size
        _check_pixels(name, width, height, opts)
        # libheif applies the container's rotation/mirror itself; pillow-heif then resets the
        # EXIF orientation, so nothing is applied twice.
        return np.asarray(heif)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # libheif reports everything as ValueError/RuntimeError
        msg = _first_line(exc)
        if "end of file" in msg.lower() or "insufficient input" in msg.lower():
            raise TruncatedImageError(name, f"HEIF data cut short: {msg}") from exc
        raise CorruptImageError(name, f"HEIF decoder error: {msg}") from exc


def _to_bgr8(img: np.ndarray, name: str) -> np.ndarray:
    """Any decoded array -> 3-channel uint8 BGR; alpha composited over white."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise UnsupportedFormatError(name, f"unsupported pixel layout {img.shape}")
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise UnsupportedFormatError(name, f"unsupported sample type {img.dtype}")
    channels = img.shape[2]
    has_alpha = channels in (2, 4)
    if img.dtype == np.uint8 and not has_alpha:
        return img if channels == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.dtype == np.uint16 and not has_alpha:
        # Scale 0..65535 onto 0..255 with rounding (x/257), not truncation (x>>8).
        img8 = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
        return img8 if channels == 3 else cv2.cvtColor(img8, cv2.COLOR_GRAY2BGR)
    f = img.astype(np.float32) * np.float32(1.0 / scale)
    if has_alpha:
        # Composite over white rather than black or dropping alpha: transparent images are mostly
        # product shots cut out from a white studio background, and white keeps them looking
        # like their neighbours in the clusters.
        alpha = np.clip(f[:, :, -1:], 0.0, 1.0)
        colour = f[:, :, :-1]
        f = colour * alpha + (1.0 - alpha)
    out = np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out if out.shape[2] == 3 else cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)


def _fit(img: np.ndarray, opts: DecodeOptions) -> np.ndarray:
    s = opts.size
    h, w = img.shape[:2]
    if opts.resize == "crop" and h != w:
        # Cropping the centred square first and resizing that is the same as "shorter side to
        # size, then centre crop", but resizes fewer pixels.
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        img = img[y0 : y0 + side, x0 : x0 + side]
        h = w = side
    if (h, w) == (s, s):
        return img
    # INTER_AREA averages all source pixels when shrinking (no aliasing); it is a poor upscaler.
    interp = cv2.INTER_AREA if h >= s and w >= s else cv2.INTER_LINEAR
    return cv2.resize(img, (s, s), interpolation=interp)


def _apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 (as Pillow's ImageOps.exif_transpose does)."""
    if orientation == 2:
        return cv2.flip(img, 1)
    if orientation == 3:
        return cv2.rotate(img, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(img, 0)
    if orientation == 5:
        return cv2.transpose(img)
    if orientation == 6:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.rotate(cv2.transpose(img), cv2.ROTATE_180)
    if orientation == 8:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return img


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
