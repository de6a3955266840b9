"""Tests for segd.media.headers: dimensions, completeness and EXIF orientation from headers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefiles import (
    COLOUR,
    FORMATS,
    HUGE_HEADERS,
    exif_bytes,
    good_jpeg,
    good_png,
    jpeg_with_size,
    pil_encode,
    solid,
)
from PIL import Image

from segd.media.headers import exif_orientation, looks_truncated, probe_size

FMTS = ["jpeg", "png", "gif", "bmp", "webp", "tiff", "heif", "avif"]

# ---------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_probe_size_reads_header(name: str) -> None:
    make, _, _ = FORMATS[name]
    probed = probe_size(make())
    assert probed is not None
    fmt, w, h = probed
    if fmt in ("heif", "avif"):
        # the largest 'ispe' is an upper bound: coded size before a 'clap' crop (64x48 -> 64x64)
        assert w >= 64 and h >= 48
    else:
        assert (w, h) == (64, 48)


@pytest.mark.parametrize(("data", "fmt", "w", "h"), HUGE_HEADERS)
def test_probe_other_formats(data: bytes, fmt: str, w: int, h: int) -> None:
    assert probe_size(data) == (fmt, w, h)


def test_unknown_or_unreadable_headers_probe_as_none() -> None:
    assert probe_size(b"hello") is None
    assert probe_size(jpeg_with_size(good_jpeg(), 0, 0)) is None
    assert probe_size(good_png()[:20]) is None


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 0xFFFF), st.integers(1, 0xFFFF))
def test_jpeg_probe_matches_header(w: int, h: int) -> None:
    assert probe_size(jpeg_with_size(good_jpeg(), w, h)) == ("jpeg", w, h)


# ---------------------------------------------------------------------------------------------
# Completeness
# ---------------------------------------------------------------------------------------------


def test_complete_files_do_not_look_truncated() -> None:
    for name, fmt in [("jpeg", "jpeg"), ("png", "png"), ("webp-lossy", "webp"), ("gif", "gif"),
                      ("bmp", "bmp")]:  # fmt: skip
        assert not looks_truncated(fmt, FORMATS[name][0]()), name
    assert not looks_truncated("png", good_png() + b"trailing junk")


def test_cut_files_look_truncated() -> None:
    for name, fmt in [("jpeg", "jpeg"), ("png", "png"), ("webp-lossy", "webp"), ("gif", "gif"),
                      ("bmp", "bmp")]:  # fmt: skip
        assert looks_truncated(fmt, FORMATS[name][0]()[:-3]), name


def test_an_eoi_before_the_scan_is_not_the_images_eoi() -> None:
    # as in an EXIF thumbnail: a complete little JPEG inside a header segment
    data = good_jpeg()
    thumb = b"\xff\xe2\x00\x08\xff\xd8\xff\xd9\xff\xd9"
    assert not looks_truncated("jpeg", data[:2] + thumb + data[2:])
    assert looks_truncated("jpeg", data[:2] + thumb + data[2:-2])


def test_formats_without_a_check_never_look_truncated() -> None:
    assert not looks_truncated("tiff", b"II*\x00")
    assert not looks_truncated("heif", b"")


# ---------------------------------------------------------------------------------------------
# EXIF orientation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_read(orientation: int, fmt: str) -> None:
    data = pil_encode(Image.fromarray(solid(COLOUR)), fmt, exif=exif_bytes(orientation))
    assert exif_orientation(fmt.lower(), data) == orientation


def webp_with_exif_chunk(payload: bytes) -> bytes:
    body = b"WEBP" + b"EXIF" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_webp_exif_with_or_without_a_jpeg_style_prefix() -> None:
    tiff = exif_bytes(6).removeprefix(b"Exif\x00\x00")
    assert exif_orientation("webp", webp_with_exif_chunk(tiff)) == 6
    assert exif_orientation("webp", webp_with_exif_chunk(b"Exif\x00\x00" + tiff)) == 6


def test_missing_garbage_or_out_of_range_exif_is_1() -> None:
    assert exif_orientation("jpeg", good_jpeg()) == 1
    tiff = b"MM\x00*\xff\xff\xff\xff" + b"zzzz"  # IFD offset points far outside the block
    assert exif_orientation("webp", webp_with_exif_chunk(tiff)) == 1
    nine = exif_bytes(9).removeprefix(b"Exif\x00\x00")
    assert exif_orientation("webp", webp_with_exif_chunk(nine)) == 1
    # TIFF and HEIF arrive oriented by their decoders: their tags are not read here
    assert exif_orientation("tiff", pil_encode(Image.fromarray(solid(COLOUR)), "TIFF",
                                               tiffinfo={274: 6})) == 1


# ---------------------------------------------------------------------------------------------
# Garbage never raises
# ---------------------------------------------------------------------------------------------


def read_every_header(data: bytes) -> None:
    probe_size(data)
    for fmt in FMTS:
        looks_truncated(fmt, data)
        assert 1 <= exif_orientation(fmt, data) <= 8


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_never_raise(data: bytes) -> None:
    read_every_header(data)


SEEDS = [FORMATS[k][0]() for k in ("jpeg", "png", "webp-lossy", "gif", "bmp", "tiff", "avif")]
SEEDS.append(pil_encode(Image.fromarray(solid(COLOUR)), "JPEG", exif=exif_bytes(6)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(range(len(SEEDS))),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 4096),
)
def test_mutated_headers_never_raise(seed: int, edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[seed])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    read_every_header(bytes(data[: len(data) - cut] if cut < len(data) else data))


def test_seeds_are_what_they_claim() -> None:
    assert exif_orientation("jpeg", SEEDS[-1]) == 6
    assert all(probe_size(s) is not None for s in SEEDS)
