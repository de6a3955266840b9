"""Reading the user's intentions off a library scan and the store's view (pure)."""

from __future__ import annotations

from pathlib import Path

from segd.core.corrections import (
    Corrections,
    DiskFile,
    KnownCluster,
    KnownImage,
    LibraryScan,
    Placement,
    Retirement,
    detect,
    needs_hash,
)

LIB = Path("/lib")


class World:
    """A small library: cluster folders, files on disk, and the store's rows for them."""

    def __init__(self) -> None:
        self.folders: dict[str, str] = {}
        self.files: dict[Path, DiskFile] = {}
        self.clusters: list[KnownCluster] = []
        self.images: list[KnownImage] = []
        self._ino = 100

    def cluster(self, cid: int, folder: str) -> None:
        self.folders[folder] = f"1:{cid}"
        self.clusters.append(KnownCluster(cid, folder, f"1:{cid}"))

    def photo(self, iid: int, folder: str, name: str, cid: int | None, *,
              state: str = "sorted", pinned: bool = False, size: int = 1000) -> None:
        path = LIB / folder / name
        self._ino += 1
        fid = f"1:{self._ino}"
        self.files[path] = DiskFile(path, fid, size + iid)
        self.images.append(KnownImage(iid, path, f"sha{iid}", state, cid, pinned, fid,
                                      size + iid))

    def move(self, src: str, dst: str) -> None:
        f = self.files.pop(LIB / src)
        self.files[LIB / dst] = DiskFile(LIB / dst, f.file_id, f.size)

    def copy(self, src: str, dst: str) -> None:
        """Same bytes, a new inode: what a copy across filesystems or a backup restore does."""
        f = self.files.pop(LIB / src)
        self._ino += 1
        self.files[LIB / dst] = DiskFile(LIB / dst, f"2:{self._ino}", f.size)

    def mkdir(self, name: str) -> None:
        self._ino += 1
        self.folders[name] = f"1:{self._ino}"

    def scan(self) -> LibraryScan:
        return LibraryScan(LIB, dict(self.folders), tuple(self.files.values()))

    def detect_images(self, present: frozenset[int] = frozenset()) -> list[KnownImage]:
        """The store's rows, each `present` as an lstat of its path would say."""
        return [KnownImage(i.id, i.path, i.sha256, i.state, i.cluster_id, i.pinned,
                           i.file_id, i.file_size,
                           present=i.path in self.files or i.id in present)
                for i in self.images]

    def detect(self, hashes: dict[Path, str] | None = None) -> Corrections:
        return detect(self.scan(), self.clusters, self.detect_images(), hashes)


def pets() -> World:
    w = World()
    w.cluster(1, "dogs")
    w.cluster(2, "cats")
    w.cluster(3, "panda")
    for i in range(1, 6):
        w.photo(i, "dogs", f"d{i}.jpg", 1)
    for i in range(6, 10):
        w.photo(i, "cats", f"c{i}.jpg", 2)
    for i in range(10, 12):
        w.photo(i, "panda", f"p{i}.jpg", 3)
    return w


def test_an_untouched_library_has_no_corrections() -> None:
    c = pets().detect()
    assert c.empty and c.seen == ()


def test_a_file_moved_into_another_cluster_folder_is_pinned_there() -> None:
    w = pets()
    w.move("dogs/d1.jpg", "cats/d1.jpg")
    c = w.detect()
    assert c.placements == (Placement(1, LIB / "cats/d1.jpg", 2, None, True, 1, True),)
    assert c.forgotten == () and c.retired == () and c.new_folders == {}


def test_a_pinned_file_moved_within_its_folder_stays_pinned() -> None:
    w = World()
    w.cluster(1, "dogs")
    w.photo(1, "dogs", "a.jpg", 1, pinned=True)
    w.photo(2, "dogs", "b.jpg", 1)
    w.move("dogs/a.jpg", "dogs/renamed.jpg")
    w.move("dogs/b.jpg", "dogs/b2.jpg")
    c = w.detect()
    assert [(p.image_id, p.pin, p.cluster_id) for p in c.placements] == [(1, True, 1),
                                                                         (2, False, 1)]


def test_a_renamed_folder_keeps_its_cluster_and_moves_nothing() -> None:
    w = pets()
    w.folders["pandas"] = w.folders.pop("panda")
    for name in ("p10.jpg", "p11.jpg"):
        w.move(f"panda/{name}", f"pandas/{name}")
    c = w.detect()
    assert c.renamed == {3: "pandas"}
    assert c.placements == () and c.forgotten == () and c.retired == ()


def test_a_folder_the_user_made_becomes_a_cluster_of_its_pinned_members() -> None:
    w = pets()
    w.mkdir("mine")
    w.move("dogs/d2.jpg", "mine/d2.jpg")
    w.move("cats/c6.jpg", "mine/c6.jpg")
    w.move("panda/p10.jpg", "mine/p10.jpg")
    c = w.detect()
    assert c.new_folders == {"mine": (2, 6, 10)}
    assert all(p.pin and p.folder == "mine" and p.cluster_id is None for p in c.placements)
    assert c.forgotten == ()  # the regression: they are on disk, not gone


def test_files_copied_in_from_outside_are_arrivals_in_their_folder() -> None:
    w = pets()
    w.mkdir("mine")
    w.files[LIB / "mine/new.jpg"] = DiskFile(LIB / "mine/new.jpg", "1:900", 5)
    w.files[LIB / "cats/new2.jpg"] = DiskFile(LIB / "cats/new2.jpg", "1:901", 6)
    w.files[LIB / "loose.jpg"] = DiskFile(LIB / "loose.jpg", "1:902", 7)
    c = w.detect()
    assert c.arrivals == {"cats": (LIB / "cats/new2.jpg",), "mine": (LIB / "mine/new.jpg",)}
    assert c.new_folders == {"mine": ()}
    assert c.ignored == (LIB / "loose.jpg",)


def test_moving_every_file_of_a_folder_into_another_merges_them() -> None:
    w = pets()
    for i in range(6, 10):
        w.move(f"cats/c{i}.jpg", f"dogs/c{i}.jpg")
    c = w.detect()
    assert c.retired == (Retirement(2, "merged", "dogs"),)
    assert {p.image_id for p in c.placements if p.pin and p.cluster_id == 1} == {6, 7, 8, 9}


def test_emptying_or_deleting_a_folder_retires_its_cluster_without_moving_files() -> None:
    w = pets()
    w.move("cats/c6.jpg", "dogs/c6.jpg")
    w.move("cats/c7.jpg", "panda/c7.jpg")
    del w.files[LIB / "cats/c8.jpg"]
    del w.files[LIB / "cats/c9.jpg"]
    c = w.detect()
    assert c.retired == (Retirement(2, "emptied"),)
    assert set(c.forgotten) == {8, 9}
    del w.folders["cats"]
    assert w.detect().retired == (Retirement(2, "deleted"),)


def test_a_file_whose_folder_was_deleted_is_followed_by_identity_anywhere_in_the_tree() -> None:
    w = pets()
    del w.folders["panda"]
    w.move("panda/p10.jpg", "dogs/deep/er/p10.jpg")
    w.move("panda/p11.jpg", "cats/p11.jpg")
    c = w.detect()
    assert c.forgotten == ()
    assert {(p.image_id, p.cluster_id, p.pin) for p in c.placements} == {(10, 1, True),
                                                                       (11, 2, True)}
    assert c.retired == (Retirement(3, "deleted"),)


def test_a_copy_with_a_new_identity_is_followed_by_size_and_sha256() -> None:
    w = pets()
    w.copy("dogs/d3.jpg", "cats/d3.jpg")
    w.files[LIB / "cats/other.jpg"] = DiskFile(LIB / "cats/other.jpg", "9:1", 1003)
    wanted = needs_hash(w.scan(), w.clusters, w.detect_images())
    # Only the unknown files of a missing image's size are worth hashing.
    assert wanted == {LIB / "cats/d3.jpg", LIB / "cats/other.jpg"}
    unhashed = w.detect()
    assert unhashed.forgotten == (3,)  # without the hash nothing ties them together
    c = w.detect({LIB / "cats/d3.jpg": "sha3", LIB / "cats/other.jpg": "shaX"})
    assert c.forgotten == ()
    assert c.placements == (Placement(3, LIB / "cats/d3.jpg", 2, None, True, 1, True),)
    assert c.arrivals == {"cats": (LIB / "cats/other.jpg",)}


def test_only_a_file_gone_from_the_whole_library_is_forgotten() -> None:
    w = pets()
    del w.files[LIB / "dogs/d4.jpg"]
    c = w.detect()
    assert c.forgotten == (4,) and c.placements == () and c.retired == ()


def test_a_pending_file_the_user_moved_into_a_cluster_folder_is_pinned_there() -> None:
    w = pets()
    inbox = Path("/inbox/x.jpg")
    w.images.append(KnownImage(50, inbox, "sha50", "pending", None, file_id="1:77",
                               file_size=3))
    w.files[LIB / "cats/x.jpg"] = DiskFile(LIB / "cats/x.jpg", "1:77", 3)
    c = w.detect()
    assert c.placements == (Placement(50, LIB / "cats/x.jpg", 2, None, True, None, True),)


def test_files_outside_the_scan_count_as_present_by_their_lstat() -> None:
    w = pets()
    w.images.append(KnownImage(60, Path("/inbox/y.jpg"), "sha60", "pending", None))
    c = detect(w.scan(), w.clusters, w.detect_images(present={60}))
    assert c.empty
    assert detect(w.scan(), w.clusters, w.detect_images()).forgotten == (60,)


def test_a_folder_replaced_by_a_symlink_keeps_its_cluster_and_files() -> None:
    w = pets()
    del w.folders["cats"]
    for i in range(6, 10):
        del w.files[LIB / f"cats/c{i}.jpg"]
    scan = LibraryScan(LIB, w.folders, tuple(w.files.values()), blocked=frozenset({"cats"}))
    c = detect(scan, w.clusters, w.detect_images(present={6, 7, 8, 9}))
    assert c.empty
