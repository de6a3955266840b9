"""Read an image's header without decoding it: dimensions, completeness, EXIF orientation.

The dimensions feed the decompression-bomb guard, before any pixel is decoded.

The parsers may raise IndexError/ValueError/struct.error on garbage; the public functions
catch those and never raise.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from segd.media.formats import sniff

__all__ = [
    "CHECKED_BEFORE_DECODING",
    "TRUNCATION_REASON",
    "exif_orientation",
    "looks_truncated",
    "probe_size",
]

# --------------------------------------------------------------------------------------------
# Dimensions
# --------------------------------------------------------------------------------------------

# JPEG SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but don't.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def probe_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) from the header, or None if unknown or unreadable.

    Never raises. For HEIF/AVIF the size is the largest image item ('ispe'), an upper bound for
    the primary image, which is what a bomb guard needs. For GIF it is the logical screen.
    """
    fmt = sniff(data)
    if fmt is None:
        return None
    try:
        dims = _PROBES[fmt](data)
    except (IndexError, ValueError, struct.error, OverflowError):
        dims = None
    if dims is None or dims[0] <= 0 or dims[1] <= 0:
        return None
    return fmt, dims[0], dims[1]


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
# Completeness
# --------------------------------------------------------------------------------------------

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

TRUNCATION_REASON = {
    "jpeg": "JPEG has no end-of-image marker (file cut short or still being written)",
    "png": "PNG has no IEND chunk (file cut short or still being written)",
    "webp": "WebP is shorter than its RIFF header says",
    "gif": "GIF has no trailer (file cut short)",
    "bmp": "BMP is shorter than its header says",
}


# Checked before decoding, because a decoder may accept them cut short; GIF and BMP are only
# checked after a decoder failure, to tell "truncated" from "corrupt", because real files often
# carry a wrong size field or junk after the GIF trailer and still decode fine.
CHECKED_BEFORE_DECODING = frozenset({"jpeg", "png", "webp"})


def looks_truncated(fmt: str, data: bytes) -> bool:
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


def exif_orientation(fmt: str, data: bytes) -> int:
    """The EXIF Orientation tag (1..8) of a JPEG, PNG or WebP; 1 when absent or unreadable."""
    try:
        block = _exif_block(fmt, data)
        if block is None:
            return 1
        value = _tiff_tags(block[0], block[1], frozenset({274})).get(274, 1)
    except (IndexError, ValueError, struct.error):
        return 1  # unreadable EXIF: show the pixels as stored rather than reject the photo
    return value if 1 <= value <= 8 else 1

