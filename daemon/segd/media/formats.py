"""Tell an image file's format from its magic bytes (never its suffix), or say what else it is."""

from __future__ import annotations

__all__ = ["SUPPORTED_SUFFIXES", "describe_non_image", "recognise_unsupported", "sniff"]

# The suffixes of the formats segd decodes, for callers that list folders; decoding itself goes by
# the bytes, so a misnamed file still decodes.
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

# ISO-BMFF brands. AVIF is decoded by OpenCV (built with libavif); HEIC/HEIF by pillow-heif.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

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


def sniff(data: bytes) -> str | None:
    """The format segd decodes these bytes as ("jpeg", "png", ... "heif"), or None."""
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


def recognise_unsupported(data: bytes) -> str | None:
    """What a file segd does not decode is, when its signature says so (e.g. "PDF document")."""
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


def describe_non_image(data: bytes) -> str:
    """The reason given for bytes that are no image format at all."""
    sample = data[:512]
    if sample and all(32 <= b < 127 or b in b"\t\n\r" for b in sample):
        return "no image signature (looks like text)"
    return f"no image signature (starts with {data[:8].hex(' ')})"

