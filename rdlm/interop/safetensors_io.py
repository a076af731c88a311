"""Read and write the safetensors format with NumPy alone (bf16 through ml_dtypes), tensor by tensor.

A local file is memory-mapped tensor by tensor; a gs:// file is read one tensor's byte range at a time. So
a 3.5B checkpoint is never read into memory as a whole. Writing streams tensors one after another into a
single file (local or gs://).
"""

import json
import struct
from collections.abc import Callable, Iterator, Mapping

import ml_dtypes
import numpy as np

from rdlm import storage

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: its header, and memory-mapped tensors on demand."""

    def __init__(self, path):
        self.path = storage.path(path)
        with storage.open(self.path, "rb", random_access=True) as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path} is not a safetensors file (bad header: {e}).") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}.")
        dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {shape}.")
        local = storage.local_path(self.path)
        if local is None or not shape or end == begin:
            with storage.open(self.path, "rb", random_access=True) as f:
                f.seek(self._data_start + begin)
                return np.frombuffer(f.read(end - begin), dtype).reshape(shape)
        return np.memmap(local, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


class CheckpointTensors(Mapping):
    """All tensors of a checkpoint directory: one `model.safetensors`, or shards listed in an index."""

    def __init__(self, directory):
        directory = storage.path(directory)
        index = directory / INDEX_FILE
        if storage.exists(index):
            weight_map = json.loads(storage.read_text(index))["weight_map"]
            files = {name: SafetensorsFile(directory / name) for name in sorted(set(weight_map.values()))}
            self._where = {key: files[name] for key, name in weight_map.items()}
        else:
            single = directory / SINGLE_FILE
            if not storage.exists(single):
                found = [name.rsplit("/", 1)[-1] for name in storage.glob(f"{directory}/*.safetensors")]
                if len(found) != 1:
                    raise FileNotFoundError(
                        f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (found {found or 'no'} "
                        ".safetensors files); point to a Hugging Face checkpoint directory."
                    )
                single = directory / found[0]
            file = SafetensorsFile(single)
            self._where = {key: file for key in file.keys()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_file(path, tensors: Mapping[str, Callable[[], np.ndarray]], shapes: Mapping[str, tuple], dtypes: Mapping, metadata=None):
    """Writes tensors to one file; each value is a thunk, called (and released) one at a time."""
    header, offset = {}, 0
    for key in tensors:
        dtype = np.dtype(dtypes[key])
        size = dtype.itemsize * int(np.prod(shapes[key]))
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with storage.atomic_write(path, "wb") as f:  # a failed write leaves no truncated file behind
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, make in tensors.items():
            array = np.ascontiguousarray(make(), dtype=dtypes[key])
            if array.shape != tuple(shapes[key]):
                raise ValueError(f"Tensor {key!r} has shape {array.shape}; its header says {tuple(shapes[key])}.")
            f.write(array.reshape(-1).view(np.uint8).data)
