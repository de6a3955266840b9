"""Tests for segd.media.formats: formats told from magic bytes, other files named."""

from __future__ import annotations

import pytest
from imagefiles import FORMATS, good_jpeg

from segd.media.formats import (
    SUPPORTED_SUFFIXES,
    describe_non_image,
    recognise_unsupported,
    sniff,
)


def test_supported_suffixes() -> None:
    for s in [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"]:
        assert s in SUPPORTED_SUFFIXES
    assert all(s.startswith(".") and s == s.lower() for s in SUPPORTED_SUFFIXES)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_is_sniffed(name: str) -> None:
    expected = "heif" if name == "heic" else name.split("-")[0].removesuffix("16")
    assert sniff(FORMATS[name][0]()) == expected


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8", b"BM" + b"\x00" * 12 + (99).to_bytes(4, "little"), b"BMP is a format",
     b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", b"RIFF\x00\x00\x00\x00WAVEfmt "],
)  # fmt: skip
def test_look_alikes_are_not_sniffed(data: bytes) -> None:
    assert sniff(data) is None


def test_heif_brand_found_among_compatible_brands() -> None:
    # major brand mif1, HEIC named only as a compatible brand
    assert sniff(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heicmiaf" + b"\x00" * 8) == "heif"
    assert sniff(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + b"\x00" * 8) == "avif"


@pytest.mark.parametrize(
    ("data", "label"),
    [
        (b"8BPS\x00\x01" + b"\x00" * 40, "Photoshop PSD"),
        (b"%PDF-1.7\n", "PDF document"),
        (b"\xff\x0a\xfa", "JPEG XL"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", "ISO media (brand 'isom', e.g. video)"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "RIFF 'WAVE' (not WebP)"),
        (b"P6\n640 480\n255\n", "Netpbm"),
        (b'  <?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    ],
)  # fmt: skip
def test_unsupported_formats_are_named(data: bytes, label: str) -> None:
    assert recognise_unsupported(data) == label


def test_supported_and_unknown_bytes_are_not_called_unsupported() -> None:
    assert recognise_unsupported(good_jpeg()) is None
    assert recognise_unsupported(b"Dear diary") is None


def test_non_images_are_described() -> None:
    text = describe_non_image(b"Dear diary,\nnot a photo\n")
    assert text == "no image signature (looks like text)"
    assert describe_non_image(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08") == (
        "no image signature (starts with 00 01 02 03 04 05 06 07)")
