"""Tests for segd.media.decode: colour, orientation, resizing and typed errors for bad input."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import (
    COLOUR,
    FORMATS,
    HAVE_HEIF,
    HUGE_HEADERS,
    PHOTOS,
    RED,
    SMALL,
    assert_image,
    bgr,
    cv_encode,
    exif_bytes,
    good_jpeg,
    good_png,
    heic_bytes,
    jpeg_with_size,
    pil_encode,
    png_claiming,
    solid,
)
from PIL import Image

from segd.core.errors import (
    CorruptImageError,
    EmptyFileError,
    FileAccessError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from segd.media import decode as dec
from segd.media.decode import (
    HEIF_MISSING_REASON,
    DecodeOptions,
    decode_bytes,
    decode_file,
    heif_available,
    read_image_file,
)

# ---------------------------------------------------------------------------------------------
# Formats and colour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_decodes_with_correct_colour(name: str, tmp_path: Path) -> None:
    make, expected, tol = FORMATS[name]
    path = tmp_path / f"img.{name}"  # suffix deliberately meaningless: detection is by magic
    path.write_bytes(make())
    out = decode_file(path, SMALL)
    assert_image(out, 32)
    diff = np.abs(out.astype(int) - np.array(expected)).max()
    assert diff <= tol, (name, out[0, 0], expected)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_pure_red_is_channel_0(ext: str) -> None:
    data = cv_encode(ext, bgr(solid(RED)))
    out = decode_bytes(data, SMALL)
    assert out[..., 0].min() >= 250
    assert out[..., 1:].max() <= 5


def test_16bit_is_scaled_with_rounding_not_truncated() -> None:
    # 200/257 = 0.78 -> 1 (truncation x>>8 would give 0); 32896 = 128*257 -> 128; 65535 -> 255;
    # 33023 = 128.5*257 -> 128 or 129, never 128 by truncation of a value that rounds to 129.
    for value, want in [(200, 1), (32896, 128), (65535, 255), (128 * 257 + 200, 129)]:
        data = cv_encode(".png", np.full((8, 8), value, np.uint16))
        out = decode_bytes(data, DecodeOptions(size=8))
        assert (out == want).all(), (value, out[0, 0])


def test_alpha_composited_over_white() -> None:
    a = np.zeros((8, 24, 4), np.uint8)
    a[:, :, 0] = 255  # red everywhere ...
    a[:, :8, 3] = 0  # ... fully transparent on the left,
    a[:, 8:16, 3] = 128  # half transparent in the middle,
    a[:, 16:, 3] = 255  # opaque on the right
    data = pil_encode(Image.fromarray(a, "RGBA"), "PNG")
    out = decode_bytes(data, DecodeOptions(size=8, resize="squash"))
    # squash 24 -> 8 columns maps each third to 8/3 columns; look at the clean edges
    assert tuple(out[4, 0]) == (255, 255, 255)
    assert tuple(out[4, 7]) == (255, 0, 0)
    r, g, b = (int(v) for v in out[4, 4])
    assert r == 255 and 120 <= g <= 135 and g == b


def test_16bit_rgba_alpha() -> None:
    a = np.zeros((8, 8, 4), np.uint16)
    a[..., 2] = 65535  # BGRA: red
    a[..., 3] = 0  # fully transparent
    out = decode_bytes(cv_encode(".png", a), DecodeOptions(size=8))
    assert (out == 255).all()


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = pil_encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_bytes(data, DecodeOptions(size=16))
    assert out[..., 0].min() >= 250 and out[..., 2].max() <= 5


def test_real_photos_decode() -> None:
    photos = sorted(PHOTOS.glob("*/*.jpg"))
    assert photos
    for p in photos:
        assert_image(decode_file(p, DecodeOptions()), 160)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        DecodeOptions(size=0)
    with pytest.raises(ValueError):
        DecodeOptions(resize="stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecodeOptions(max_pixels=0)


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------


def halves(h: int = 40, w: int = 80) -> np.ndarray:
    """Left half red, right half blue."""
    a = solid((0, 0, 255), h, w)
    a[:, : w // 2] = RED
    return a


def is_red(px: np.ndarray) -> bool:
    return px[0] > 200 and px[2] < 60


def is_blue(px: np.ndarray) -> bool:
    return px[2] > 200 and px[0] < 60


@pytest.mark.parametrize("reduced", [False, True])
def test_jpeg_exif_orientation_6_is_applied(reduced: bool) -> None:
    # Stored landscape, left red / right blue. Orientation 6 = rotate 90 degrees clockwise for
    # display: red ends up on top, blue at the bottom. A large image exercises reduced decoding.
    src = halves(800, 1600) if reduced else halves()
    data = pil_encode(Image.fromarray(src), "JPEG", exif=exif_bytes(6), quality=95)
    opts = DecodeOptions(size=32, resize="squash", reduced_decode=reduced)
    out = decode_bytes(data, opts)
    assert is_red(out[2, 16]) and is_blue(out[29, 16]), (out[2, 16], out[29, 16])
    # and without the EXIF tag, it stays landscape
    plain = decode_bytes(pil_encode(Image.fromarray(src), "JPEG", quality=95), opts)
    assert is_red(plain[16, 2]) and is_blue(plain[16, 29])


def quadrants() -> np.ndarray:
    """Four distinct colours, so every one of the 8 orientations gives a different picture."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:16, :24] = (255, 0, 0)
    a[:16, 24:] = (0, 255, 0)
    a[16:, :24] = (0, 0, 255)
    a[16:, 24:] = (255, 255, 0)
    return a


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_all_orientations_match_pillow(orientation: int, fmt: str) -> None:
    from PIL import ImageOps

    img = Image.fromarray(quadrants())
    kw: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    if fmt == "JPEG":
        kw = {"quality": 100}
    data = pil_encode(img, fmt, exif=exif_bytes(orientation), **kw)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    opts = DecodeOptions(size=16, resize="squash")
    out = decode_bytes(data, opts)
    ref = cv2.resize(want, (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref).mean() < 4, orientation


def test_tiff_orientation_applied_once() -> None:
    # OpenCV applies the TIFF Orientation tag itself; we must not apply it a second time.
    data = pil_encode(Image.fromarray(halves()), "TIFF", tiffinfo={274: 6})
    out = decode_bytes(data, DecodeOptions(size=32, resize="squash"))
    assert is_red(out[2, 16]) and is_blue(out[29, 16])


@pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif not installed")
def test_heic_orientation_applied_once() -> None:
    data = heic_bytes(halves(), exif=exif_bytes(6))
    out = decode_bytes(data, DecodeOptions(size=32, resize="squash"))
    assert is_red(out[2, 16]) and is_blue(out[29, 16])


def test_garbage_exif_is_ignored() -> None:
    data = cv_encode(".jpg", bgr(solid(COLOUR)))
    tiff = b"MM\x00*\xff\xff\xff\xff" + b"zzzz"  # IFD offset points far outside the block
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    out = decode_bytes(data[:2] + app1 + data[2:], SMALL)
    assert np.abs(out.astype(int) - COLOUR).max() <= 4


# ---------------------------------------------------------------------------------------------
# Resize policies and reduced decoding
# ---------------------------------------------------------------------------------------------


def thirds(h: int, w: int, vertical: bool = False) -> np.ndarray:
    """Blue | green | red thirds along the long axis."""
    a = np.zeros((h, w, 3), np.uint8)
    n = h if vertical else w
    for i, c in enumerate([(0, 0, 255), (0, 255, 0), (255, 0, 0)]):
        sl = slice(i * n // 3, (i + 1) * n // 3)
        if vertical:
            a[sl] = c
        else:
            a[:, sl] = c
    return a


@pytest.mark.parametrize("vertical", [False, True])
def test_crop_keeps_the_centre(vertical: bool) -> None:
    img = thirds(300, 100, vertical=True) if vertical else thirds(100, 300)
    out = decode_bytes(cv_encode(".png", bgr(img)), DecodeOptions(size=32, resize="crop"))
    assert_image(out, 32)
    assert (out == (0, 255, 0)).all()


@pytest.mark.parametrize("vertical", [False, True])
def test_squash_keeps_everything(vertical: bool) -> None:
    img = thirds(300, 90, vertical=True) if vertical else thirds(90, 300)
    out = decode_bytes(cv_encode(".png", bgr(img)), DecodeOptions(size=30, resize="squash"))
    assert_image(out, 30)
    first, mid, last = (out[2, 15], out[15, 15], out[27, 15]) if vertical else (
        out[15, 2], out[15, 15], out[15, 27])
    assert tuple(first) == (0, 0, 255) and tuple(mid) == (0, 255, 0) and tuple(last) == (255, 0, 0)


def test_small_images_are_upscaled() -> None:
    out = decode_bytes(cv_encode(".png", bgr(solid(COLOUR, 10, 12))), DecodeOptions(size=160))
    assert_image(out, 160)
    assert (out == COLOUR).all()


@pytest.mark.parametrize(
    ("w", "h", "factor"),
    [(4000, 3000, 8), (1600, 1200, 4), (1279, 960, 4), (640, 480, 2), (400, 300, 0),
     (159, 1000, 0)],
)
def test_reduction_factor_keeps_shorter_side(w: int, h: int, factor: int) -> None:
    flag = dec._jpeg_flag(w, h, DecodeOptions(size=160))
    expected = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4,
                2: cv2.IMREAD_REDUCED_COLOR_2, 0: cv2.IMREAD_COLOR}[factor]  # fmt: skip
    assert flag == expected | cv2.IMREAD_IGNORE_ORIENTATION


def test_reduced_decode_close_to_full_decode() -> None:
    photo = sorted(PHOTOS.glob("*/*.jpg"))[0]
    src = cv2.imread(str(photo))
    big = cv2.resize(src, (1600, int(1600 * src.shape[0] / src.shape[1])), cv2.INTER_CUBIC)
    data = cv_encode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    for resize in ("crop", "squash"):
        full = decode_bytes(data, DecodeOptions(resize=resize, reduced_decode=False))
        fast = decode_bytes(data, DecodeOptions(resize=resize))
        assert np.abs(full.astype(int) - fast.astype(int)).mean() < 3.0


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def corrupt_png_body() -> bytes:
    data = bytearray(good_png())
    start = data.find(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(range(50))  # IDAT CRC and zlib stream now wrong
    return bytes(data)


BAD_BYTES: dict[str, tuple[bytes, type[ImageError]]] = {
    "empty": (b"", EmptyFileError),
    "random": (bytes(np.random.default_rng(3).integers(0, 256, 4096, np.uint8)), NotAnImageError),
    "text": (b"Dear diary,\nthis is not a photo.\n" * 20, NotAnImageError),
    "corrupt-png": (corrupt_png_body(), CorruptImageError),
    "jpeg-zero-size": (jpeg_with_size(good_jpeg(), 0, 0), CorruptImageError),
    "jpeg-header-only": (good_jpeg()[:200], TruncatedImageError),
    "jpeg-no-eoi": (good_jpeg()[:-2], TruncatedImageError),
    # an EOI inside a header segment (as in an EXIF thumbnail) must not count as the image's EOI
    "jpeg-no-eoi-thumbnail": (good_jpeg()[:2] + b"\xff\xe2\x00\x0a\xff\xd8\xff\xd9\xff\xd9"
                              + good_jpeg()[2:-2], TruncatedImageError),
    "png-half": (good_png()[: len(good_png()) // 2], TruncatedImageError),
    "png-no-iend": (good_png()[:-12], TruncatedImageError),
    "png-9-bytes": (good_png()[:9], TruncatedImageError),
    "psd": (b"8BPS\x00\x01" + b"\x00" * 40, UnsupportedFormatError),
    "pdf": (b"%PDF-1.7\n" + b"x" * 100, UnsupportedFormatError),
    "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
            UnsupportedFormatError),
    "mp4": (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64,
            UnsupportedFormatError),
    "bomb-png": (png_claiming(100_000, 100_000), ImageTooLargeError),
    "bomb-jpeg": (jpeg_with_size(good_jpeg(), 65_000, 65_000), ImageTooLargeError),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_bad_input_gives_typed_error_naming_the_file(case: str, tmp_path: Path) -> None:
    data, error = BAD_BYTES[case]
    path = tmp_path / f"bad-{case}.jpg"
    path.write_bytes(data)
    with pytest.raises(error) as info:
        decode_file(path, DecodeOptions())
    assert type(info.value) is error
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert info.value.reason and info.value.reason in str(info.value)


def test_decode_bytes_uses_name() -> None:
    with pytest.raises(NotAnImageError, match="photo-42"):
        decode_bytes(b"hello", DecodeOptions(), name="photo-42")


def test_bomb_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("decoder must not be called for a bomb")

    monkeypatch.setattr(dec.cv2, "imdecode", boom)
    for data in (png_claiming(100_000, 100_000), jpeg_with_size(good_jpeg(), 65_000, 65_000)):
        with pytest.raises(ImageTooLargeError, match=r"100000000|max_pixels"):
            decode_bytes(data, DecodeOptions())
    # max_pixels is honoured exactly
    with pytest.raises(ImageTooLargeError):
        decode_bytes(good_png(), DecodeOptions(max_pixels=32 * 24 - 1))
    monkeypatch.undo()
    assert_image(decode_bytes(good_png(), DecodeOptions(max_pixels=32 * 24)), 160)


@pytest.mark.parametrize("name", ["jpeg", "png", "webp-lossy"])
def test_cut_files_are_truncated_however_lenient_the_decoder(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A decoder that accepts anything, as libraries and versions differ: a file still being
    # copied is reported as truncated all the same, so it is tried again once complete.
    monkeypatch.setattr(dec.cv2, "imdecode", lambda *_a: np.zeros((48, 64, 3), np.uint8))
    data = FORMATS[name][0]()
    assert_image(decode_bytes(data, SMALL), 32)
    with pytest.raises(TruncatedImageError):
        decode_bytes(data[:-20], SMALL)


@pytest.mark.parametrize(("data", "fmt", "w", "h"), HUGE_HEADERS)
def test_bomb_guard_covers_other_formats(data: bytes, fmt: str, w: int, h: int) -> None:
    with pytest.raises(ImageTooLargeError, match=f"{w}x{h}"):
        decode_bytes(data, DecodeOptions())


@pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif not installed")
def test_heic_bomb_guard() -> None:
    data = heic_bytes(solid(COLOUR))
    with pytest.raises(ImageTooLargeError):
        decode_bytes(data, DecodeOptions(max_pixels=1000))


def test_opencv_pixel_limit_becomes_typed_error(tmp_path: Path) -> None:
    # OpenCV has its own limit (OPENCV_IO_MAX_IMAGE_PIXELS, read once per process) and raises a
    # cv2.error beyond it: that must surface as ImageTooLargeError. Needs a fresh process.
    path = tmp_path / "x.png"
    path.write_bytes(cv_encode(".png", bgr(solid(COLOUR, 20, 20))))
    code = (
        "import sys\nfrom segd.media.decode import decode_file, DecodeOptions\n"
        "from segd.core.errors import ImageTooLargeError\n"
        "try:\n    decode_file(sys.argv[1], DecodeOptions())\n"
        "except ImageTooLargeError as e:\n    print('OK', e)\n"
    )
    env = {**os.environ, "OPENCV_IO_MAX_IMAGE_PIXELS": "100"}
    res = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.stdout.startswith("OK"), res.stdout + res.stderr


# --- reading the file (segd.media.reader; tests/media/test_reader.py) ---------------------


def test_decode_file_reports_unreadable_files_by_name(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    with pytest.raises(FileAccessError, match="does not exist") as info:
        decode_file(path, DecodeOptions())
    assert str(path) in str(info.value)
    with pytest.raises(FileAccessError, match="directory"):
        decode_file(tmp_path, DecodeOptions())


def test_file_size_limit_follows_max_pixels(tmp_path: Path) -> None:
    opts = DecodeOptions(max_pixels=1000)
    path = tmp_path / "big.png"
    path.write_bytes(good_png() + b"\0" * (opts.max_file_bytes - len(good_png()) + 1))
    with pytest.raises(ImageTooLargeError, match=f"over the {opts.max_file_bytes} byte limit"):
        read_image_file(path, opts)
    with pytest.raises(ImageTooLargeError, match="byte limit"):
        decode_file(path, opts)


def test_read_image_file_can_refuse_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "real.jpg"
    target.write_bytes(good_jpeg())
    link = tmp_path / "link.jpg"
    link.symlink_to(target)
    data, st = read_image_file(link, DecodeOptions())
    assert data == good_jpeg() and st.st_ino == target.stat().st_ino
    with pytest.raises(FileAccessError, match="symbolic link"):
        read_image_file(link, DecodeOptions(), follow_symlinks=False)


# --- HEIF availability ------------------------------------------------------------------------


def test_heif_missing_gives_clear_unsupported_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # `None` in sys.modules makes `import pillow_heif` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    assert not heif_available()
    data = b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heicmiaf" + b"\x00" * 64
    with pytest.raises(UnsupportedFormatError) as info:
        decode_bytes(data, DecodeOptions(), name="IMG_0001.HEIC")
    assert HEIF_MISSING_REASON in str(info.value)
    assert "pip install 'segd[heif]'" in str(info.value)
    assert "IMG_0001.HEIC" in str(info.value)


@pytest.mark.skipif(not HAVE_HEIF, reason="pillow-heif not installed")
def test_heic_truncated_and_corrupt() -> None:
    data = heic_bytes(solid(COLOUR))
    for n in range(12, len(data), 7):
        with pytest.raises(ImageError):
            decode_bytes(data[:n], SMALL)


# ---------------------------------------------------------------------------------------------
# Truncation at every length and fuzzing
# ---------------------------------------------------------------------------------------------


def decode_or_image_error(data: bytes) -> np.ndarray | ImageError:
    try:
        return decode_bytes(data, SMALL)
    except ImageError as exc:
        return exc


def test_every_truncation_of_a_jpeg() -> None:
    data = good_jpeg()
    for n in range(len(data)):
        res = decode_or_image_error(data[:n])
        if n < 3:
            assert isinstance(res, (EmptyFileError, NotAnImageError)), n
        else:  # a JPEG without its EOI marker is truncated, never silently accepted
            assert isinstance(res, TruncatedImageError), (n, res)
    assert isinstance(decode_or_image_error(data), np.ndarray)


def test_every_truncation_of_a_png() -> None:
    data = good_png()
    for n in range(len(data)):
        res = decode_or_image_error(data[:n])
        if n < 8:
            assert isinstance(res, (EmptyFileError, NotAnImageError)), n
        else:  # a PNG without its complete IEND chunk is truncated
            assert isinstance(res, TruncatedImageError), (n, res)
    assert isinstance(decode_or_image_error(data), np.ndarray)
    # junk appended after IEND is tolerated
    assert isinstance(decode_or_image_error(data + b"trailing junk"), np.ndarray)


@pytest.mark.parametrize("name", ["webp-lossy", "webp-lossless", "gif", "bmp", "tiff", "tiff16",
                                  "jpeg-progressive", "png16", "avif"])  # fmt: skip
def test_every_truncation_of_other_formats(name: str) -> None:
    data = FORMATS[name][0]()
    step = max(1, len(data) // 300)
    for n in range(0, len(data), step):
        res = decode_or_image_error(data[:n])
        assert isinstance(res, (np.ndarray, ImageError)), (n, res)


SEEDS = [FORMATS[k][0]() for k in ("jpeg", "png", "webp-lossy", "gif", "bmp", "tiff", "avif")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_only_raise_image_errors(data: bytes) -> None:
    assert isinstance(decode_or_image_error(data), (np.ndarray, ImageError))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 4096),
)
def test_mutated_headers_only_raise_image_errors(
    seed: int, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    mutated = bytes(data[: len(data) - cut] if cut < len(data) else data)
    assert isinstance(decode_or_image_error(mutated), (np.ndarray, ImageError))
