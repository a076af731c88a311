"""Read and write the safetensors format with NumPy alone (bf16 through ml_dtypes), tensor by tensor.

A local file is memory-mapped tensor by tensor; a gs:// file is read one tensor's byte range at a time. So
a 3.5B checkpoint is never read into memory as a whole. Writing streams tensors one after another into a
single file (local or gs://).

Why not the `safetensors` package: its lazy reader (`safe_open`) takes a local file name only, and
`safetensors.numpy.load` needs the whole file in memory, so neither reads a gs:// checkpoint one byte range
at a time through rdlm.storage. The format is small (an 8-byte length, a JSON header, raw little-endian
bytes), and this reader checks what the package checks before touching any data: the header length
against the file size and the package's 100 MB header limit, the header as a JSON object, each tensor's
dtype, shape and offsets inside the data. A file that fails is one sentence naming it. Nothing is ever
unpickled (safetensors holds no pickles; no other weight format is read).
"""

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import NoReturn

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
MAX_HEADER_BYTES = 100_000_000  # the safetensors package's own limit


class SafetensorsFile:
    """One .safetensors file: its header, and memory-mapped tensors on demand."""

    def __init__(self, path):
        self.path = storage.path(path)
        with storage.open(self.path, "rb", random_access=True) as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                self._refuse(f"it is {size} bytes long, too short for the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                self._refuse(f"its header length {header_len:,} exceeds the format's limit of {MAX_HEADER_BYTES:,} bytes")
            if 8 + header_len > size:
                self._refuse(f"its header length {header_len:,} runs past the end of the {size:,}-byte file (truncated?)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._refuse(f"its header is not JSON ({e})")
        if not isinstance(header, dict):
            self._refuse(f"its header is a JSON {type(header).__name__}, not an object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        for key, entry in header.items():
            self._check_entry(key, entry, size - self._data_start)

    def _refuse(self, why: str) -> NoReturn:
        raise ValueError(f"{self.path} is not a valid safetensors file: {why}; download or convert it again.")

    def _check_entry(self, key: str, entry, data_bytes: int) -> None:
        """Refuses a header entry whose dtype, shape or byte range does not describe data inside the file."""
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape) and (
                isinstance(begin, int) and isinstance(end, int))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            self._refuse(f"its header entry for {key!r} is not {{dtype, shape, data_offsets}}: {str(entry)[:200]}")
        if not 0 <= begin <= end <= data_bytes:
            self._refuse(f"tensor {key!r} lies at bytes [{begin}, {end}) of a {data_bytes}-byte data section")

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
            try:
                weight_map = dict(json.loads(storage.read_text(index))["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index with a weight_map ({type(e).__name__}: {e}).") from None
            names = sorted({str(name) for name in weight_map.values()})
            outside = [name for name in names if "/" in name or "\\" in name or name.startswith(".")]
            if outside:
                raise ValueError(f"{index} names shard(s) {outside[:3]} outside its directory; refusing to read them.")
            files = {name: SafetensorsFile(directory / name) for name in names}
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
