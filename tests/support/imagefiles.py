"""Image files made at runtime (cv2.imencode / Pillow, offline) for the media tests."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segd.media import headers
from segd.media.decode import DecodeOptions, heif_available

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
HAVE_HEIF = heif_available()
SMALL = DecodeOptions(size=32)


def solid(rgb: tuple[int, int, int], h: int = 48, w: int = 64) -> np.ndarray:
    """An RGB image filled with one colour."""
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rgb
    return a


def cv_encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    """Encode with OpenCV; `img` is in OpenCV's channel order (BGR / BGRA / grey)."""
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok, ext
    return buf.tobytes()


def pil_encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def heic_bytes(rgb: np.ndarray, **kw: object) -> bytes:
    import pillow_heif

    b = io.BytesIO()
    pillow_heif.from_pillow(Image.fromarray(rgb)).save(b, format="HEIF", quality=95, **kw)
    return b.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, otherwise valid PNG whose IHDR claims width x height (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )

def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF frame size of a JPEG."""
    out = bytearray(data)
    for marker, start, _end in headers._jpeg_segments(data):
        if marker in headers._JPEG_SOF:
            out[start + 1 : start + 5] = struct.pack(">HH", height, width)
            return bytes(out)
    raise AssertionError("no SOF")



RED = (255, 0, 0)
COLOUR = (200, 40, 90)  # arbitrary non-symmetric colour: catches BGR/RGB swaps


def _pal_png(transparent: bool) -> bytes:
    p = Image.new("P", (64, 48), 0)
    p.putpalette([*COLOUR, 0, 255, 0])
    return pil_encode(p, "PNG", **({"transparency": 1} if transparent else {}))


def _grey16() -> bytes:
    g = np.full((48, 64), 150 * 257, np.uint16)
    return cv_encode(".png", g)


# name -> (bytes factory, expected RGB, tolerance)
FORMATS: dict[str, tuple[Callable[[], bytes], tuple[int, int, int], int]] = {
    "jpeg": (lambda: cv_encode(".jpg", bgr(solid(COLOUR)), [cv2.IMWRITE_JPEG_QUALITY, 95]),
             COLOUR, 4),
    "jpeg-progressive": (lambda: cv_encode(".jpg", bgr(solid(COLOUR)),
                                           [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), COLOUR, 4),
    "jpeg-grey": (lambda: cv_encode(".jpg", np.full((48, 64), 150, np.uint8)), (150,) * 3, 2),
    "png": (lambda: cv_encode(".png", bgr(solid(COLOUR))), COLOUR, 0),
    "png16": (lambda: cv_encode(".png", bgr(solid(COLOUR)).astype(np.uint16) * 257), COLOUR, 0),
    "png-grey": (lambda: cv_encode(".png", np.full((48, 64), 150, np.uint8)), (150,) * 3, 0),
    "png-grey16": (_grey16, (150,) * 3, 0),
    "png-grey-alpha": (lambda: pil_encode(Image.new("LA", (64, 48), (150, 255)), "PNG"),
                       (150,) * 3, 0),
    "png-rgba": (lambda: pil_encode(Image.new("RGBA", (64, 48), (*COLOUR, 255)), "PNG"),
                 COLOUR, 0),
    "png-palette": (lambda: _pal_png(False), COLOUR, 0),
    "png-palette-trns": (lambda: _pal_png(True), COLOUR, 0),
    "webp-lossless": (lambda: cv_encode(".webp", bgr(solid(COLOUR)),
                                        [cv2.IMWRITE_WEBP_QUALITY, 101]), COLOUR, 0),
    "webp-lossy": (lambda: cv_encode(".webp", bgr(solid(COLOUR)), [cv2.IMWRITE_WEBP_QUALITY, 90]),
                   COLOUR, 6),
    "webp-alpha": (lambda: pil_encode(Image.new("RGBA", (64, 48), (*COLOUR, 255)), "WEBP",
                                      lossless=True), COLOUR, 0),
    "bmp": (lambda: cv_encode(".bmp", bgr(solid(COLOUR))), COLOUR, 0),
    "bmp-grey": (lambda: cv_encode(".bmp", np.full((48, 64), 150, np.uint8)), (150,) * 3, 0),
    "tiff": (lambda: cv_encode(".tiff", bgr(solid(COLOUR))), COLOUR, 0),
    "tiff16": (lambda: cv_encode(".tiff", bgr(solid(COLOUR)).astype(np.uint16) * 257), COLOUR, 0),
    "gif": (lambda: pil_encode(Image.fromarray(solid(COLOUR)), "GIF"), COLOUR, 0),
    "avif": (lambda: cv_encode(".avif", bgr(solid(COLOUR)), [cv2.IMWRITE_AVIF_QUALITY, 100]),
             COLOUR, 8),
}  # fmt: skip
if HAVE_HEIF:
    FORMATS["heic"] = (lambda: heic_bytes(solid(COLOUR)), COLOUR, 8)


def assert_image(out: np.ndarray, size: int) -> None:
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]




def good_png() -> bytes:
    rng = np.random.default_rng(1)
    return cv_encode(".png", rng.integers(0, 256, (24, 32, 3), np.uint8))


def good_jpeg() -> bytes:
    rng = np.random.default_rng(2)
    img = cv2.resize(rng.integers(0, 256, (6, 8, 3), np.uint8), (64, 48))
    return cv_encode(".jpg", img)


def webp_vp8x(w: int, h: int) -> bytes:
    payload = b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


# Hand-made headers of huge images: (bytes, format, width, height).
HUGE_HEADERS: list[tuple[bytes, str, int, int]] = [
    (b"GIF89a" + struct.pack("<HH", 60000, 60000) + b"\x00" * 20, "gif", 60000, 60000),
    (b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 50000, -50000) + b"\x00" * 30,
     "bmp", 50000, 50000),
    (webp_vp8x(16000, 16000), "webp", 16000, 16000),
    (b"II*\x00\x08\x00\x00\x00\x02\x00" + struct.pack("<HHII", 256, 4, 1, 90000)
     + struct.pack("<HHII", 257, 3, 1, 40000) + b"\x00" * 8, "tiff", 90000, 40000),
    (b"MM\x00*\x00\x00\x00\x08\x00\x02" + struct.pack(">HHIHH", 256, 3, 1, 30000, 0)
     + struct.pack(">HHII", 257, 4, 1, 70000) + b"\x00" * 8, "tiff", 30000, 70000),
]  # fmt: skip


def exif_bytes(orientation: int) -> bytes:
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()
