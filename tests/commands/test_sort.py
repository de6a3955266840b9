"""`segd sort` end to end, as a user runs it: a subprocess on a copy of the test photos.

SRC is the 40 CC0 photos flattened into one folder (the class is the file-name prefix),
plus three bad files and a subfolder holding one more photo. Three runs are shared by the
tests below (each takes seconds): the default copy with --plot, a second run into the same
DEST, and --move --recursive --k 3.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
import yaml
from sklearn.metrics import adjusted_rand_score

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
MANIFEST_HEADER = ["source", "destination", "cluster", "distance", "error"]
REASONS_HEADER = ["source", "destination", "kind", "reason"]
BAD = {"corrupt.jpg": "truncated", "empty.jpg": "empty", "notes.jpg": "not-an-image"}
TWIN = "shoes_0003.jpg"  # also in SRC/sub, as a different file with the same pixels
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Measured ARI of the default run against the file-name classes: 0.70 (k = 4; the dresses
# split between the t-shirts and the hats, see test_cluster.test_real_photos_choose_k).
MIN_ARI = 0.6


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every regular file under root: relative path -> (sha256, inode, mtime_ns)."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (sha(path), st.st_ino, st.st_mtime_ns)
    return out


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes, identical pixels."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def make_src(root: Path) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    for photo in sorted(PHOTOS.glob("*/*.jpg")):
        shutil.copy2(photo, src / photo.name)
    sample = (PHOTOS / "hat" / "hat_0000.jpg").read_bytes()
    (src / "corrupt.jpg").write_bytes(sample[: len(sample) // 3])
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.jpg").write_text("shopping list: milk, eggs\n")
    (src / "sub").mkdir()
    (src / "sub" / TWIN).write_bytes(with_comment((src / TWIN).read_bytes(), b"segd test"))
    return src


@dataclass
class Run:
    src: Path
    dest: Path
    proc: subprocess.CompletedProcess[str]
    src_before: dict[str, tuple[str, int, int]]

    @property
    def stdout(self) -> str:
        return self.proc.stdout


def segd_sort(tmp: Path, src: Path, dest: Path, *args: str) -> Run:
    config = tmp / "segd-config.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({"model": {"gpu": "off"}}))
    env = dict(os.environ, SEGD_CONFIG=str(config),
               # One BLAS/OpenMP thread: on a small busy machine the pools spin against each
               # other and the fit takes several times longer; results do not change.
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    before = snapshot(src)
    proc = subprocess.run([sys.executable, "-m", "segd", "sort", str(src), str(dest),
                           "--no-progress", *args],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"segd sort failed:\n{proc.stdout}\n{proc.stderr}"
    return Run(src, dest, proc, before)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    return [dict(zip(header, row, strict=True)) for row in rows[1:]]


def csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def class_of(path: str) -> str:
    return Path(path).name.split("_")[0]


def silhouette_table(stdout: str) -> tuple[dict[int, float], int | None]:
    scores: dict[int, float] = {}
    chosen = None
    for line in stdout.splitlines():
        m = re.match(r"^\s*(\d+)\s+(-?\d+\.\d+)\s+#*(\s+<- chosen)?\s*$", line)
        if m:
            scores[int(m.group(1))] = float(m.group(2))
            if m.group(3):
                chosen = int(m.group(1))
    return scores, chosen


def cluster_folders(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.is_dir() and p.name.startswith("cluster-"))


# --------------------------------------------------------------------------- the default run


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("sort-default")
    src = make_src(tmp)
    return segd_sort(tmp, src, tmp / "dest", "--plot", str(tmp / "plots" / "silhouette.png"))


def test_copy_leaves_src_intact(default_run: Run) -> None:
    assert snapshot(default_run.src) == default_run.src_before


def test_dest_layout(default_run: Run) -> None:
    dest = default_run.dest
    folders = cluster_folders(dest)
    assert folders == [f"cluster-{i:02d}" for i in range(1, len(folders) + 1)]
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [*folders, "_unreadable", "manifest.csv"])
    placed = [p for f in folders for p in (dest / f).iterdir()]
    assert all(p.is_file() and p.suffix == ".jpg" for p in placed)
    assert sorted(p.name for p in placed) == sorted(p.name for p in PHOTOS.glob("*/*.jpg"))
    # Numbered by size, largest first.
    sizes = [len(list((dest / f).iterdir())) for f in folders]
    assert sizes == sorted(sizes, reverse=True)


def test_unreadable_files_set_aside_with_reasons(default_run: Run) -> None:
    bad = default_run.dest / "_unreadable"
    assert csv_header(bad / "reasons.csv") == REASONS_HEADER
    rows = read_csv(bad / "reasons.csv")
    assert {Path(r["source"]).name: r["kind"] for r in rows} == BAD
    for row in rows:
        assert row["reason"]
        copy = Path(row["destination"])
        assert copy.parent == bad
        assert copy.read_bytes() == Path(row["source"]).read_bytes()
    assert sorted(p.name for p in bad.iterdir()) == sorted([*BAD, "reasons.csv"])


def test_manifest_has_one_row_per_source_file(default_run: Run) -> None:
    manifest = default_run.dest / "manifest.csv"
    assert csv_header(manifest) == MANIFEST_HEADER
    rows = read_csv(manifest)
    sources = [Path(r["source"]) for r in rows]
    expected = sorted(p for p in default_run.src.iterdir() if p.is_file())  # not sub/: no -r
    assert sorted(sources) == expected
    for row in rows:
        source, destination = Path(row["source"]), Path(row["destination"])
        assert destination.read_bytes() == source.read_bytes()
        if source.name in BAD:
            assert row["cluster"] == "_unreadable" and row["distance"] == ""
            assert row["error"].startswith(BAD[source.name] + ": ")
        else:
            assert row["error"] == ""
            assert destination.parent == default_run.dest / row["cluster"]
            assert 0.0 <= float(row["distance"]) <= 2.0


def test_summary_table_shows_k_and_silhouette(default_run: Run) -> None:
    scores, chosen = silhouette_table(default_run.stdout)
    assert sorted(scores) == list(range(2, 11))  # the defaults: k_min 2, k_max 10
    assert chosen is not None and scores[chosen] == max(scores.values())
    folders = cluster_folders(default_run.dest)
    assert len(folders) == chosen
    for folder in folders:  # the size table agrees with the disk
        size = len(list((default_run.dest / folder).iterdir()))
        assert re.search(rf"^{folder}\s+{size}$", default_run.stdout, re.MULTILINE)
    assert "3 unreadable files set aside" in default_run.stdout


def test_clusters_follow_the_classes(default_run: Run) -> None:
    rows = [r for r in read_csv(default_run.dest / "manifest.csv") if not r["error"]]
    assert len(rows) == 40
    ari = adjusted_rand_score([class_of(r["source"]) for r in rows],
                              [r["cluster"] for r in rows])
    assert ari >= MIN_ARI


def test_plot_is_a_png(default_run: Run) -> None:
    plot = default_run.dest.parent / "plots" / "silhouette.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(plot), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert image.std() > 0  # not a blank canvas
    assert f"silhouette plot written to {plot}" in default_run.stdout


# --------------------------------------------------------------------------- a second run


def test_second_run_into_the_same_dest_never_overwrites(default_run: Run,
                                                        tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    shutil.copytree(default_run.dest, dest)  # the earlier run's result, as a fresh folder
    before = snapshot(dest)
    segd_sort(tmp_path, default_run.src, dest)
    after = snapshot(dest)
    for rel, (digest, inode, mtime) in before.items():
        assert after[rel] == (digest, inode, mtime), f"{rel} was touched by the second run"
    new = {rel: after[rel] for rel in after.keys() - before.keys()}
    assert "manifest (2).csv" in new and "_unreadable/reasons (2).csv" in new
    # Every photo and bad file was placed again, under a suffixed name beside the first.
    placed = sorted(Path(rel).name for rel in new if not rel.endswith(".csv"))
    expected = sorted(re.sub(r"\.jpg$", " (2).jpg", name) for name in
                      [*(p.name for p in PHOTOS.glob("*/*.jpg")), *BAD])
    assert placed == expected
    # The second manifest points at the new copies, byte-identical to the sources.
    for row in read_csv(dest / "manifest (2).csv"):
        assert Path(row["destination"]).name.endswith(" (2).jpg")
        assert sha(Path(row["destination"])) == sha(Path(row["source"]))


# --------------------------------------------------------------------------- --move -r --k 3


@pytest.fixture(scope="module")
def move_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("sort-move")
    src = make_src(tmp)
    digests = {str(p.relative_to(src)): sha(p) for p in src.rglob("*") if p.is_file()}
    return segd_sort(tmp, src, tmp / "dest", "--move", "--recursive", "--k", "3"), digests


def test_move_empties_src(move_run: tuple[Run, dict[str, str]]) -> None:
    run, _ = move_run
    assert [p for p in run.src.rglob("*") if not p.is_dir()] == []
    assert "moved 41 images into 3 folders" in run.stdout


def test_move_places_every_file_exactly_once(move_run: tuple[Run, dict[str, str]]) -> None:
    run, digests = move_run
    placed = [p for p in run.dest.rglob("*.jpg")]
    assert Counter(sha(p) for p in placed) == Counter(digests.values())


def test_fixed_k_gives_that_many_folders(move_run: tuple[Run, dict[str, str]]) -> None:
    run, _ = move_run
    assert cluster_folders(run.dest) == ["cluster-01", "cluster-02", "cluster-03"]


def test_recursive_includes_the_subfolder(move_run: tuple[Run, dict[str, str]]) -> None:
    run, _ = move_run
    sources = {r["source"] for r in read_csv(run.dest / "manifest.csv")}
    assert str(run.src / "sub" / TWIN) in sources
    assert len(sources) == 44  # 40 photos, 3 bad files, the photo in sub/


def test_same_name_in_one_run_both_survive(move_run: tuple[Run, dict[str, str]]) -> None:
    run, digests = move_run
    rows = {r["source"]: r for r in read_csv(run.dest / "manifest.csv")}
    top, nested = rows[str(run.src / TWIN)], rows[str(run.src / "sub" / TWIN)]
    # Same pixels, so the same cluster: the names really collide.
    assert top["cluster"] == nested["cluster"]
    assert Path(top["destination"]).name == TWIN
    assert Path(nested["destination"]).name == "shoes_0003 (2).jpg"
    assert sha(Path(top["destination"])) == digests[TWIN]
    assert sha(Path(nested["destination"])) == digests[f"sub/{TWIN}"]
    assert digests[TWIN] != digests[f"sub/{TWIN}"]
