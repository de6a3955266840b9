"""Contact sheets: one row per cluster, the given images in order."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segd.views.overview import THUMB, ClusterSample, render_overview, write_overview

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"


def test_sheet_has_one_row_per_cluster_with_the_photos(tmp_path: Path) -> None:
    hats = sorted((PHOTOS / "hat").glob("*.jpg"))[:3]
    shoes = sorted((PHOTOS / "shoes").glob("*.jpg"))[:2]
    missing = tmp_path / "gone.jpg"  # removed since: its slot stays empty, no crash
    clusters = [ClusterSample("hats", 3, hats), ClusterSample("shoes", 2, [*shoes, missing])]
    sheet = render_overview(clusters)
    assert sheet.shape[0] >= 2 * THUMB and sheet.dtype == np.uint8
    out = tmp_path / "overview.png"
    write_overview(clusters, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = cv2.imread(str(out))
    assert decoded is not None and decoded.shape == sheet.shape
    # A thumbnail is not blank background.
    assert decoded[10:10 + THUMB, 230:230 + THUMB].std() > 10
