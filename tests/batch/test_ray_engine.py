"""`segd sort --engine ray` on a real local Ray cluster: as the local engine, and resumable.

One Ray session for the module (3 CPUs, so 3 one-CPU actors: several worker processes),
started by this process; the command-line runs are drivers of their own that join it with
--address. SRC is the 40 CC0 photos flattened, two bad files, a dangling link and a FIFO
(unreadable and no regular file: reported, left where they are) and, in a subfolder, a twin
of one photo (same pixels, other bytes), sorted with --recursive so names collide in DEST.
Every Ray run is compared with one run of the local engine on the same SRC: the same
manifest, clusters and files.

Without Ray installed the Ray tests skip; the resource shapes and the missing-extra error
are checked either way.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from segd.batch import ray_engine, shards
from segd.batch.ray_engine import ActorShape, NodeResources, RayOptions, actor_shape
from segd.batch.sort import SortOptions
from segd.config import ModelConfig
from segd.core.cluster import FitParams
from segd.core.errors import SegdError

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "photos"
TWIN = "shoes_0003.jpg"
BAD = 4  # two bad files, a dangling link, a FIFO
FILES = 40 + BAD + 1
SHARD = 4
SHARDS = math.ceil(FILES / SHARD)
RUN_TIMEOUT_S = 400
WORKER_TITLE = "ray::MapWorker(MapBatches(ShardWorker))"


# ---- without Ray


def test_one_actor_per_gpu_with_its_share_of_the_nodes_cpus() -> None:
    nodes = [NodeResources(16, 2), NodeResources(12, 1), NodeResources(8, 0)]
    assert actor_shape(nodes, "preferred") == ActorShape(cpus=8, gpus=1, actors=3)
    assert actor_shape(nodes, "required", max_actors=2) == ActorShape(8, 1, 2)
    # The GPU off: CPU actors of min(4, the smallest node's CPUs) everywhere.
    assert actor_shape(nodes, "off") == ActorShape(cpus=4, gpus=0, actors=4 + 3 + 2)
    assert actor_shape(nodes, "off", actor_cpus=6) == ActorShape(6, 0, 2 + 2 + 1)
    assert actor_shape([NodeResources(2)], "preferred") == ActorShape(2, 0, 1)
    with pytest.raises(SegdError, match=r"no node .* has a GPU"):
        actor_shape([NodeResources(8)], "required")
    with pytest.raises(SegdError, match="6 CPUs"):
        actor_shape([NodeResources(4)], "off", actor_cpus=6)


def test_without_ray_the_error_says_what_to_install(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    (tmp_path / "src").mkdir()
    opts = SortOptions(src=tmp_path / "src", dest=tmp_path / "dest", progress=False)
    with pytest.raises(SegdError, match=r"pip install 'segd\[ray\]'"):
        ray_engine.run_sort_ray(opts, ModelConfig(gpu="off"), RayOptions())


# ---- on a real local Ray cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster for the module; its GCS address (what --address takes)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'segd[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'segd[ray]'")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    # Token authentication, as Ray enables it by default; a token of the test's own, so
    # neither ~/.ray/auth_token is written nor a user's token used. The drivers started
    # below inherit it, as every node of a real cluster must have it.
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    ray.init(address="local", num_cpus=3, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray-src") / "src"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*/*.jpg")):
        shutil.copy2(photo, folder / photo.name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    os.mkfifo(folder / "pipe.jpg")
    (folder / "sub").mkdir()
    jpeg = (folder / TWIN).read_bytes()
    comment = b"segd test"
    (folder / "sub" / TWIN).write_bytes(jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(
        2, "big") + comment + jpeg[2:])
    return folder


def cli(tmp: Path, *args: str) -> list[str]:
    config = tmp / "segd-config.yaml"
    config.write_text(yaml.safe_dump({"model": {"gpu": "off"}}))
    return [sys.executable, "-m", "segd", "--config", str(config), "sort", *args,
            "--no-progress", "--no-cache", "--recursive"]


def cli_env() -> dict[str, str]:
    # One BLAS/OpenMP thread, as tests/commands/test_sort.py: a busy small machine.
    return dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def run_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cli(tmp, *args), env=cli_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"segd sort failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def ray_args(address: str) -> list[str]:
    return ["--engine", "ray", "--address", address, "--shard-size", str(SHARD),
            "--actor-cpus", "1"]


@pytest.fixture(scope="module")
def local_dest(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("local")
    run_cli(tmp, str(src), str(tmp / "dest"))
    return tmp / "dest"


def manifest(dest: Path) -> list[tuple[str, str, str, float, str]]:
    with (dest / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["source", "destination", "cluster", "distance", "error"]
    return [(src, str(Path(d).relative_to(dest)) if d else "", c,
             float(dist) if dist else math.nan, err) for src, d, c, dist, err in rows[1:]]


def reasons(dest: Path) -> list[list[str]]:
    with (dest / "_unreadable" / "reasons.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["source", "destination", "kind", "reason"]
    return [[src, str(Path(d).relative_to(dest)) if d else "", kind, why]
            for src, d, kind, why in rows[1:]]


def tree(dest: Path) -> dict[str, bytes]:
    """Every file under DEST but segd's own working folder and the two CSVs (they name
    DEST), with its bytes."""
    return {str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*"))
            if p.is_file() and shards.SHARD_DIR not in p.relative_to(dest).parts
            and p.name not in ("manifest.csv", "reasons.csv")}


def assert_sorted_as_local(dest: Path, local: Path) -> None:
    got, want = manifest(dest), manifest(local)
    assert [r[:3] + r[4:] for r in got] == [r[:3] + r[4:] for r in want]
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g[3]) and math.isnan(w[3])) or abs(g[3] - w[3]) <= 1e-3, (g, w)
    assert tree(dest) == tree(local)  # every image placed once, same names, same bytes
    assert reasons(dest) == reasons(local)
    sources = [r[0] for r in got]
    assert len(sources) == len(set(sources)) == FILES


def our_workers() -> list[int]:
    """Pids of this test session's embedding actors (descendants of this process)."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return sorted(p for p, title in titles.items() if title.startswith(WORKER_TITLE) and ours(p))


def shard_files(dest: Path) -> dict[str, tuple[int, int]]:
    folder = shards.shards_folder(dest)
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.npz")}


@pytest.mark.slow
def test_ray_sorts_exactly_as_the_local_engine(cluster: str, src: Path, local_dest: Path,
                                               tmp_path: Path) -> None:
    proc = run_cli(tmp_path, str(src), str(tmp_path / "dest"), *ray_args(cluster))
    assert_sorted_as_local(tmp_path / "dest", local_dest)
    # The link and the FIFO are reported with no destination, and stay in SRC.
    left = {Path(row[0]).name: row[1] for row in reasons(tmp_path / "dest")}
    assert left["gone.jpg"] == left["pipe.jpg"] == ""
    assert (src / "gone.jpg").is_symlink() and (src / "pipe.jpg").exists()
    assert "actors of 1 CPU" in proc.stdout  # the report names the engine
    assert len(shard_files(tmp_path / "dest")) == SHARDS
    assert not (tmp_path / "dest" / shards.SHARD_DIR / "job").exists()  # the plan is done with


@pytest.mark.slow
@pytest.mark.thread_leak_ok("Ray Data's executor threads outlive the dataset by a moment")
def test_a_worker_killed_mid_run_costs_nothing(cluster: str, src: Path, local_dest: Path,
                                               tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    killed: list[tuple[int, int]] = []  # (pid, shards done when it was killed)
    stop = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            done = len(shard_files(dest))
            workers = our_workers()
            if 1 <= done < SHARDS - 2 and len(workers) >= 2:
                os.kill(workers[0], signal.SIGKILL)
                killed.append((workers[0], done))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, name="test-killer")
    thread.start()
    try:
        result = ray_engine.run_sort_ray(
            SortOptions(src=src, dest=dest, recursive=True, fit=FitParams(), progress=False),
            ModelConfig(gpu="off"), RayOptions(shard_size=SHARD, actor_cpus=1))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert killed, "no embedding actor was seen working to be killed"
    pid, done = killed[0]
    assert done < SHARDS and not Path(f"/proc/{pid}").exists()
    assert result.placed == FILES - BAD
    assert_sorted_as_local(dest, local_dest)


@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_shards(cluster: str, src: Path, local_dest: Path,
                                                 tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    driver = subprocess.Popen(cli(tmp_path, str(src), str(dest), *ray_args(cluster)),
                              env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(shard_files(dest)) < 2:
            assert driver.poll() is None, "the driver finished before it could be killed"
            assert time.monotonic() < deadline, "no shard was written in time"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    before = shard_files(dest)
    assert 2 <= len(before) < SHARDS
    assert not (dest / "manifest.csv").exists()

    proc = run_cli(tmp_path, str(src), str(dest), *ray_args(cluster))
    after = shard_files(dest)
    assert len(after) == SHARDS
    # The finished shards were read, never redone (same inode, same mtime).
    assert {name: after[name] for name in before} == before
    assert_sorted_as_local(dest, local_dest)
    assert f"{len(before)} of {SHARDS} shards were embedded by an earlier run" in proc.stderr
