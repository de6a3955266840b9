"""Reads a legacy-format ``torch.save`` state dict into numpy arrays, without PyTorch.

A restricted unpickler: only ``OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the plain
storage types are allowed, so no code from the file runs. The legacy (pre-1.6, non-zip) format is
three small pickles (magic number, protocol version, system info), the state dict pickle whose
tensors refer to storages by persistent id, the list of storage keys, then each storage's raw
bytes in that order, each preceded by its int64 element count.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

# torch.save's legacy (pre-1.6, non-zip) format starts with this pickled number.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        assert self.storage.data is not None, self.storage.key
        item = self.storage.dtype.itemsize
        flat = self.storage.data[self.offset :]
        arr = np.lib.stride_tricks.as_strided(
            flat, self.shape, tuple(s * item for s in self.stride), writeable=False
        )
        return np.array(arr)  # a contiguous copy, detached from the storage


def _rebuild_tensor_v2(
    storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _TensorRef:
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _DataUnpickler(pickle.Unpickler):
    """Plain data only: any global (class or function) in the stream is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the .pth file")


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict of plain tensors and nothing else: no code runs from the file."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return name  # stands for the storage type in persistent ids
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the .pth file")

    def persistent_load(self, pid: Any) -> _Storage:
        # Legacy layout: ("storage", type, key, location, numel, view_metadata).
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, type_name, key, _location, numel, view = pid
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(key, STORAGE_DTYPES[type_name], int(numel))
        return self.storages[key]


def read_state_dict(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format ``torch.save`` state dict, as numpy arrays."""
    f = io.BytesIO(data)
    if zipfile.is_zipfile(f):
        raise ValueError("zip-format .pth files (torch >= 1.6) are not supported by this reader")
    f.seek(0)
    magic, version, info = (_DataUnpickler(f).load() for _ in range(3))
    if magic != LEGACY_MAGIC or version != 1001 or not info.get("little_endian"):
        raise ValueError("not a little-endian legacy torch.save file")
    unpickler = _StateDictUnpickler(f)
    state = unpickler.load()
    keys = _DataUnpickler(f).load()
    # The raw storages follow in the listed order: int64 element count, then the elements.
    for key in keys:
        st = unpickler.storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel != st.numel:
            raise ValueError(f"storage {key}: {numel} elements, expected {st.numel}")
        raw = f.read(numel * st.dtype.itemsize)
        st.data = np.frombuffer(raw, dtype=st.dtype)
    if f.read(1):
        raise ValueError("trailing bytes after the last storage")
    return {name: ref.to_numpy() for name, ref in state.items()}
