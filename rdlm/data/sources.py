"""Random-access sources of tokenized documents: ArrayRecord shards and parquet files.

The native format is ArrayRecord with one record per document holding its token ids as int32
little-endian, without BOS (packing adds it). `prepare` writes it with a `metadata.json` beside the
shards. Parquet files hold a column of token-id lists (as in `tomg-group-umd/huginn-dataset`).
Both sources return one `np.int32` array per document and pickle (for grain worker processes).
"""

import collections
import glob
import json
import os
from collections.abc import Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from array_record.python import array_record_module

METADATA_FILE = "metadata.json"
_RECORD_DTYPE = np.dtype("<i4")


def resolve_paths(paths: str | Sequence[str], field: str = "data.paths") -> list[str]:
    """Expands a glob, a comma-separated list of globs or a list of them into sorted file paths."""
    patterns = paths.split(",") if isinstance(paths, str) else list(paths)
    patterns = [p.strip() for p in patterns if p and p.strip()]
    if not patterns:
        raise ValueError(f"{field} is empty; set it to a file, a glob or a list of them.")
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(
                f"{field}: {pattern!r} matches no file; check the path or glob."
            )
        files.extend(matches)
    return files


def encode_record(ids: Sequence[int] | np.ndarray) -> bytes:
    """Serializes one document's ids in the native record format."""
    return np.asarray(ids, dtype=_RECORD_DTYPE).tobytes()


def decode_record(record: bytes) -> np.ndarray:
    """Parses one native record back into an int32 id array."""
    return np.frombuffer(record, dtype=_RECORD_DTYPE).astype(np.int32)


class ShardWriter:
    """Writes documents to one native ArrayRecord shard (group size 1, for random access)."""

    def __init__(self, path: str):
        self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        self._writer.write(encode_record(ids))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayRecordSource:
    """Documents from native ArrayRecord shards, as int32 id arrays."""

    def __init__(self, paths: Sequence[str]):
        self._records = grain.sources.ArrayRecordDataSource(list(paths))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_record(self._records[index])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} documents)"


def _flatten_lists(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Returns (offsets, values) of a list column; row i is values[offsets[i]:offsets[i + 1]]."""
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32)
    return offsets, values


class ParquetSource:
    """Documents from a column of token-id lists in parquet files, read one row group at a time.

    Only file metadata is read up front; row groups are loaded when first indexed and the most
    recent few are kept, so sequential reads are fast and shuffled reads stay correct.
    """

    _CACHED_ROW_GROUPS = 4

    def __init__(self, paths: Sequence[str], column: str = "input_ids"):
        self._paths, self._column = list(paths), column
        self._groups = []  # (path index, row group index) in order.
        sizes = []
        for i, path in enumerate(self._paths):
            meta = pq.ParquetFile(path)
            _check_column(path, meta.schema_arrow, column)
            for g in range(meta.metadata.num_row_groups):
                self._groups.append((i, g))
                sizes.append(meta.metadata.row_group(g).num_rows)
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._files, self._cache = {}, collections.OrderedDict()

    def __getstate__(self):
        return {"paths": self._paths, "column": self._column}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["column"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns (offsets, values) of one row group, from the cache when possible."""
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        file_index, row_group = self._groups[group]
        if file_index not in self._files:
            self._files[file_index] = pq.ParquetFile(self._paths[file_index])
        table = self._files[file_index].read_row_group(row_group, columns=[self._column])
        self._cache[group] = _flatten_lists(table.column(0))
        if len(self._cache) > self._CACHED_ROW_GROUPS:
            self._cache.popitem(last=False)
        return self._cache[group]

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Document {index} is out of range for {len(self)} documents.")
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        offsets, values = self._row_group(group)
        row = index - int(self._starts[group])
        return values[offsets[row]:offsets[row + 1]]

    def __repr__(self) -> str:
        return f"ParquetSource({len(self)} documents, column={self._column!r})"


def _check_column(path: str, schema: pa.Schema, column: str) -> None:
    """Raises unless `column` exists in the file and holds lists of integers."""
    if column not in schema.names:
        raise ValueError(
            f"Parquet file {path!r} has no column {column!r} (data.parquet_column); the columns "
            f"found are {schema.names}; set data.parquet_column to the one holding token ids."
        )
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)
            or pa.types.is_fixed_size_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise ValueError(
            f"Parquet column {column!r} in {path!r} has type {kind}, not a list of integer token "
            "ids; set data.parquet_column to the column holding token ids."
        )


def read_metadata(paths: Sequence[str]) -> dict | None:
    """Returns the `metadata.json` that `prepare` wrote beside the first shard, if there is one."""
    path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    tokenizer = meta.get("tokenizer")
    if tokenizer and not os.path.isabs(tokenizer):
        meta["tokenizer"] = os.path.join(os.path.dirname(path), tokenizer)
    return meta


def check_not_empty(source: Sequence, what: str) -> None:
    """Raises if `source` has no documents or only empty ones (stops at the first non-empty one)."""
    if len(source) == 0:
        raise ValueError(f"{what} holds no documents; point it at a non-empty corpus.")
    for i in range(len(source)):
        doc = source[i]
        if len(doc["ids"] if isinstance(doc, dict) else doc):
            return
    raise ValueError(f"{what} holds {len(source)} documents but zero tokens; check the corpus.")
