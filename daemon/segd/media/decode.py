"""Turn one image file into the network's input: a (size, size, 3) uint8 RGB array.

Design notes (measured against opencv-python-headless 5.0.0):

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

import io
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

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

__all__ = [
    "HEIF_MISSING_REASON",
    "SUPPORTED_SUFFIXES",
    "DecodeOptions",
    "decode_bytes",
    "decode_file",
    "heif_available",
    "probe_size",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif",
        ".png",
        ".webp",
        ".bmp", ".dib",
        ".tif", ".tiff",
        ".gif",
        ".heic", ".heif", ".hif",
        ".avif",
    }
)  # fmt: skip

HEIF_MISSING_REASON = "HEIC/HEIF needs the optional extra: pip install 'segd[heif]'"

# An uncompressed 16-bit RGBA pixel is 8 bytes: no legitimate compressed file of an image within
# max_pixels is larger than that, plus slack for metadata (or a motion-photo video appended).
_BYTES_PER_PIXEL_CAP = 8
_FILE_SLACK = 64 * 1024 * 1024

# ISO-BMFF brands. AVIF is decoded by OpenCV (built with libavif); HEIC/HEIF by pillow-heif.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

# JPEG SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but don't.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# Signatures of formats we recognise but do not decode: reported as "unsupported", not as
# "not an image", so the user learns what the file is.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"8BPS", "Photoshop PSD"),
    (b"%PDF", "PDF document"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x00\x00\x01\x00", "Windows icon"),
    (b"\x00\x00\x02\x00", "Windows cursor"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"#?RGBE", "Radiance HDR"),
    (b"qoif", "QOI"),
    (b"DDS ", "DirectDraw surface"),
    (b"FUJIFILMCCD-RAW", "Fujifilm RAW"),
    (b"IIRO", "Olympus RAW"),
    (b"IIU\x00", "Panasonic RAW"),
)


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
    return _read_regular_file(path, opts, follow_symlinks=follow_symlinks)


def decode_bytes(data: bytes, opts: DecodeOptions, name: str = "<bytes>") -> np.ndarray:
    """Decode an in-memory image file; see decode_file. `name` is used in error messages."""
    if not data:
        raise EmptyFileError(name, "file is empty (0 bytes)")
    fmt = _sniff(data)
    if fmt is None:
        what = _recognise_unsupported(data)
        if what is not None:
            raise UnsupportedFormatError(name, f"{what} files are not supported")
        raise NotAnImageError(name, _describe_non_image(data))
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
    elif _looks_truncated(fmt, data):
        raise TruncatedImageError(name, f"{fmt.upper()} header is cut short")
    else:
        raise CorruptImageError(name, f"unreadable {fmt.upper()} header")
    if fmt in _CHECKED_FOR_TRUNCATION and _looks_truncated(fmt, data):
        raise TruncatedImageError(name, _TRUNCATION_REASON[fmt])

    try:
        if fmt == "heif":
            img = _decode_heif(data, name, opts)
        else:
            img = _decode_cv2(data, fmt, width, height, opts)
        if img is None:
            if _looks_truncated(fmt, data):
                raise TruncatedImageError(name, _TRUNCATION_REASON.get(fmt, "file is cut short"))
            raise CorruptImageError(name, f"{fmt.upper()} decoder rejected the data")
        out = _fit(_to_bgr8(img, name), opts)
        if fmt not in ("tiff", "heif"):  # those two arrive already oriented, see module notes
            out = _apply_orientation(out, _exif_orientation(fmt, data))
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


def probe_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None if unknown or unreadable.

    Never raises. For HEIF/AVIF the size is the largest image item ('ispe'), an upper bound for
    the primary image, which is what a bomb guard needs. For GIF it is the logical screen.
    """
    fmt = _sniff(data)
    if fmt is None:
        return None
    try:
        dims = _PROBES[fmt](data)
    except (IndexError, ValueError, struct.error, OverflowError):
        dims = None
    if dims is None or dims[0] <= 0 or dims[1] <= 0:
        return None
    return fmt, dims[0], dims[1]


def heif_available() -> bool:
    """Whether the optional pillow-heif package can be imported (imported lazily, on demand)."""
    try:
        import pillow_heif  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but its libheif cannot be loaded
        return False
    return True


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def _read_regular_file(path: str | os.PathLike[str], opts: DecodeOptions, *,
                       follow_symlinks: bool) -> tuple[bytes, os.stat_result]:
    name = os.fspath(path)
    # stat first: opening a FIFO for reading would block until a writer appears, and a device
    # node could stream forever. Only regular files (or symlinks to them) are images.
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise FileAccessError(name, "symbolic link (not followed)")
    if not stat.S_ISREG(st.st_mode):
        raise FileAccessError(name, f"not a regular file ({_file_kind(st.st_mode)})")
    limit = opts.max_pixels * _BYTES_PER_PIXEL_CAP + _FILE_SLACK
    if st.st_size > limit:
        raise ImageTooLargeError(name, f"file is {st.st_size} bytes, over the {limit} byte limit")
    # O_NONBLOCK: belt and braces in case the path was swapped for a FIFO after the stat.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileAccessError(name, f"not a regular file ({_file_kind(st.st_mode)})")
        with io.FileIO(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)  # the file may grow while we read: stay bounded
    except OSError as exc:
        raise FileAccessError(name, _os_reason(exc)) from exc
    finally:
        os.close(fd)
    if data is None:  # only possible for a non-blocking non-regular file; be explicit anyway
        raise FileAccessError(name, "no data available")
    if len(data) > limit:
        raise ImageTooLargeError(name, f"file is over the {limit} byte limit")
    return data, st


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file does not exist (vanished?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a regular file (directory)"
    return f"cannot read: {exc.strerror or exc}"


def _file_kind(mode: int) -> str:
    for test, label in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return label
    return "special file"


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:2] == b"BM" and len(data) >= 18:
        # "BM" alone is too weak (any text starting "BM"): require a known DIB header size.
        dib = int.from_bytes(data[14:18], "little")
        if dib in (12, 16, 40, 52, 56, 64, 108, 124):
            return "bmp"
        return None
    if data[4:8] == b"ftyp":
        brands = _ftyp_brands(data)
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return None


def _ftyp_brands(data: bytes) -> set[bytes]:
    size = int.from_bytes(data[0:4], "big")
    end = min(max(size, 16), len(data), 256)
    brands = {data[8:12]}
    brands.update(data[i : i + 4] for i in range(16, end - 3, 4))
    return brands


def _recognise_unsupported(data: bytes) -> str | None:
    for magic, label in _UNSUPPORTED_SIGNATURES:
        if data.startswith(magic):
            return label
    if data[4:8] == b"ftyp":
        return f"ISO media (brand {data[8:12].decode('latin-1')!r}, e.g. video)"
    if data[:4] == b"RIFF":
        return f"RIFF {data[8:12].decode('latin-1')!r} (not WebP)"
    if len(data) > 2 and data[0:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "Netpbm"
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def _describe_non_image(data: bytes) -> str:
    sample = data[:512]
    if sample and all(32 <= b < 127 or b in b"\t\n\r" for b in sample):
        return "no image signature (looks like text)"
    return f"no image signature (starts with {data[:8].hex(' ')})"


# --------------------------------------------------------------------------------------------
# Header parsers. Each may raise IndexError/ValueError/struct.error on garbage; probe_size turns
# those into None. Returns (width, height) or None.
# --------------------------------------------------------------------------------------------


def _u16be(data: bytes, i: int) -> int:
    if i + 2 > len(data):
        raise IndexError(i)
    return (data[i] << 8) | data[i + 1]


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yield (marker, payload_start, payload_end) for the header segments up to and incl. SOS."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return  # garbage between segments
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker == 0xD9:
            return
        length = _u16be(data, i + 2)
        if length < 2:
            return
        yield marker, i + 4, i + 2 + length
        if marker == 0xDA:
            return
        i += 2 + length


def _probe_jpeg(data: bytes) -> tuple[int, int] | None:
    for marker, start, _end in _jpeg_segments(data):
        if marker in _JPEG_SOF:
            return _u16be(data, start + 3), _u16be(data, start + 1)
    return None


def _probe_png(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def _probe_gif(data: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", data[6:10])


def _probe_bmp(data: bytes) -> tuple[int, int] | None:
    dib = int.from_bytes(data[14:18], "little")
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        return struct.unpack("<HH", data[18:22])
    w, h = struct.unpack("<ii", data[18:26])
    return w, abs(h)  # negative height means top-down rows


def _probe_webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        if len(data) < 25 or data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if len(data) < 30:
            return None
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    return None


def _tiff_tags(data: bytes, base: int, wanted: frozenset[int]) -> dict[int, int]:
    """Inline SHORT/LONG values of `wanted` tags in the first IFD of a TIFF structure at `base`.

    Used both for TIFF files and for EXIF blocks (which are TIFF structures).
    """
    order = data[base : base + 2]
    if order == b"II":
        e = "<"
    elif order == b"MM":
        e = ">"
    else:
        raise ValueError("bad TIFF byte order")
    (magic,) = struct.unpack_from(e + "H", data, base + 2)
    if magic == 42:
        (ifd,) = struct.unpack_from(e + "I", data, base + 4)
        count_fmt, entry_fmt, entry_size, count_size = "H", "HHI4s", 12, 2
    elif magic == 43:  # BigTIFF
        (ifd,) = struct.unpack_from(e + "Q", data, base + 8)
        count_fmt, entry_fmt, entry_size, count_size = "Q", "HHQ8s", 20, 8
    else:
        raise ValueError("bad TIFF magic")
    pos = base + ifd
    (count,) = struct.unpack_from(e + count_fmt, data, pos)
    pos += count_size
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):  # cap: a garbage count must not make us loop for long
        tag, typ, n, value = struct.unpack_from(e + entry_fmt, data, pos + k * entry_size)
        if tag in wanted and n >= 1:
            if typ == 3:  # SHORT
                found[tag] = struct.unpack_from(e + "H", value)[0]
            elif typ == 4:  # LONG
                found[tag] = struct.unpack_from(e + "I", value)[0]
            elif typ == 16:  # LONG8 (BigTIFF)
                found[tag] = struct.unpack_from(e + "Q", value)[0]
    return found


def _probe_tiff(data: bytes) -> tuple[int, int] | None:
    tags = _tiff_tags(data, 0, frozenset({256, 257}))
    if 256 not in tags or 257 not in tags:
        return None
    return tags[256], tags[257]


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, payload_start, box_end) for ISO-BMFF boxes in data[start:end]."""
    i = start
    while i + 8 <= end:
        size = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        header = 8
        if size == 1:
            if i + 16 > end:
                return
            size = int.from_bytes(data[i + 8 : i + 16], "big")
            header = 16
        elif size == 0:
            size = end - i
        if size < header or i + size > end:
            return
        yield kind, i + header, i + size
        i += size


def _probe_isobmff(data: bytes) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind != b"meta":
            continue
        for k2, s2, e2 in _boxes(data, start + 4, end):  # meta is a full box: skip version/flags
            if k2 != b"iprp":
                continue
            for k3, s3, e3 in _boxes(data, s2, e2):
                if k3 != b"ipco":
                    continue
                for k4, s4, e4 in _boxes(data, s3, e3):
                    if k4 == b"ispe" and e4 - s4 >= 12:
                        w, h = struct.unpack(">II", data[s4 + 4 : s4 + 12])
                        if best is None or w * h > best[0] * best[1]:
                            best = (w, h)
        break
    return best


_PROBES = {
    "jpeg": _probe_jpeg,
    "png": _probe_png,
    "gif": _probe_gif,
    "bmp": _probe_bmp,
    "webp": _probe_webp,
    "tiff": _probe_tiff,
    "heif": _probe_isobmff,
    "avif": _probe_isobmff,
}


# --------------------------------------------------------------------------------------------
# Truncation and limits
# --------------------------------------------------------------------------------------------

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

_TRUNCATION_REASON = {
    "jpeg": "JPEG has no end-of-image marker (file cut short or still being written)",
    "png": "PNG has no IEND chunk (file cut short or still being written)",
    "webp": "WebP is shorter than its RIFF header says",
    "gif": "GIF has no trailer (file cut short)",
    "bmp": "BMP is shorter than its header says",
}


# Checked before decoding, because a decoder may accept them cut short; GIF and BMP are only
# checked after a decoder failure, to tell "truncated" from "corrupt", because real files often
# carry a wrong size field or junk after the GIF trailer and still decode fine.
_CHECKED_FOR_TRUNCATION = frozenset({"jpeg", "png", "webp"})


def _looks_truncated(fmt: str, data: bytes) -> bool:
    """Cheap structural check that the file is incomplete; False where we cannot tell."""
    try:
        if fmt == "jpeg":
            sos = None
            for marker, start, _end in _jpeg_segments(data):
                if marker == 0xDA:
                    sos = start
            # EOI cannot occur inside entropy-coded data (0xFF is byte-stuffed there), and an
            # embedded EXIF thumbnail's EOI lies before the SOS, so the last EOI must be after it.
            return sos is None or data.rfind(b"\xff\xd9") < sos
        if fmt == "png":
            # IEND is the last chunk and always the same 12 bytes (empty payload, fixed CRC);
            # tolerate trailing junk after it (some tools append data).
            return data.rfind(_PNG_IEND) < 33
        if fmt == "webp":
            riff = int.from_bytes(data[4:8], "little")
            return len(data) < 8 + riff
        if fmt == "gif":
            return not data.rstrip(b"\x00").endswith(b";")
        if fmt == "bmp":
            declared = int.from_bytes(data[2:6], "little")
            offset = int.from_bytes(data[10:14], "little")
            return len(data) < 26 or len(data) <= offset or (declared > 0 and len(data) < declared)
    except (IndexError, ValueError, struct.error):
        return True
    return False


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


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------


def _exif_block(fmt: str, data: bytes) -> tuple[bytes, int] | None:
    """(buffer, offset of the TIFF header) of the EXIF data, without copying the file."""
    if fmt == "jpeg":
        for marker, start, end in _jpeg_segments(data):
            if marker == 0xE1 and data[start : start + 6] == b"Exif\x00\x00":
                return data[start + 6 : end], 0
        return None
    if fmt == "png":
        i = 8
        while i + 8 <= len(data):
            length = int.from_bytes(data[i : i + 4], "big")
            kind = data[i + 4 : i + 8]
            if kind == b"eXIf":
                return data[i + 8 : i + 8 + length], 0
            if kind in (b"IDAT", b"IEND"):  # eXIf must precede the image data
                return None
            i += 12 + length
        return None
    if fmt == "webp":
        for kind, start, end in _riff_chunks(data):
            if kind == b"EXIF":
                block = data[start:end]
                # Some writers keep the JPEG-style "Exif\0\0" prefix inside the chunk.
                return (block, 6) if block.startswith(b"Exif\x00\x00") else (block, 0)
        return None
    return None


def _riff_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    i, n = 12, len(data)
    while i + 8 <= n:
        kind = data[i : i + 4]
        size = int.from_bytes(data[i + 4 : i + 8], "little")
        yield kind, i + 8, min(i + 8 + size, n)
        i += 8 + size + (size & 1)


def _exif_orientation(fmt: str, data: bytes) -> int:
    try:
        block = _exif_block(fmt, data)
        if block is None:
            return 1
        value = _tiff_tags(block[0], block[1], frozenset({274})).get(274, 1)
    except (IndexError, ValueError, struct.error):
        return 1  # unreadable EXIF: show the pixels as stored rather than reject the photo
    return value if 1 <= value <= 8 else 1


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
