"""A contact sheet: one row of thumbnails per cluster, the most typical images first, so a
person can see at a glance what each folder holds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segd.core.errors import ImageError, SegdError
from segd.media.decode import DecodeOptions, decode_file

THUMB = 112
GAP = 6
LABEL_W = 220
BACKGROUND = (245, 245, 245)


@dataclass(frozen=True)
class ClusterSample:
    name: str
    size: int
    images: Sequence[Path]  # most typical first (smallest distance to the centroid)


def render_overview(clusters: Sequence[ClusterSample], per_row: int = 8) -> np.ndarray:
    """The sheet as a BGR image."""
    rows = max(len(clusters), 1)
    width = LABEL_W + per_row * (THUMB + GAP) + GAP
    height = rows * (THUMB + GAP) + GAP
    sheet = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    opts = DecodeOptions(size=THUMB)
    for r, cluster in enumerate(clusters):
        y = GAP + r * (THUMB + GAP)
        cv2.putText(sheet, cluster.name[:22], (GAP, y + 30), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (40, 40, 40), 1, cv2.LINE_AA)
        cv2.putText(sheet, f"{cluster.size} images", (GAP, y + 56),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5, (110, 110, 110), 1, cv2.LINE_AA)
        for c, path in enumerate(cluster.images[:per_row]):
            x = LABEL_W + GAP + c * (THUMB + GAP)
            try:
                thumb = decode_file(path, opts)[..., ::-1]  # RGB -> BGR for OpenCV
            except ImageError:
                continue  # moved or removed since: leave the slot empty
            sheet[y:y + THUMB, x:x + THUMB] = thumb
    return sheet


def write_overview(clusters: Sequence[ClusterSample], out: Path) -> None:
    sheet = render_overview(clusters)
    out.parent.mkdir(parents=True, exist_ok=True)
    ext = out.suffix.lower() or ".png"
    ok, data = cv2.imencode(ext, sheet)
    if not ok:
        raise SegdError(f"cannot write an overview as {ext}: use .png or .jpg")
    out.write_bytes(data.tobytes())
