"""Random-access sources of tokenized documents: ArrayRecord shards and parquet files.

The native format is ArrayRecord with one record per document holding its token ids as int32
little-endian, without BOS (packing adds it). `prepare` writes it with a `metadata.json` beside the
shards. Parquet files hold a column of token-id lists (as in `tomg-group-umd/huginn-dataset`).
Both sources return one `np.int32` array per document and pickle (for grain worker processes). Paths may
be local or gs:// (parquet through `rdlm.storage` file objects, ArrayRecord through array_record's own
GCS client). Given a `vocab_size`, a source refuses ids outside [0, vocab_size) in one sentence naming
the file, the record and the id: parquet statistics are checked when the source opens, every record
when it is read.

Bad input is named with its file (and record): a shard that cannot be opened, an empty shard, a record
or row group that cannot be read (ArrayRecord's chunk hashes find any damage; parquet pages are checked
against their CRCs when the writer stored them, e.g. pyarrow's `write_page_checksum=True`, and otherwise
only damage that breaks decoding is found) and an id outside the vocabulary. With `on_bad_record='skip'` a bad record is returned as a `BadRecord` (the
pipeline leaves it out and counts it) and an empty shard is passed over; a shard that cannot be opened
at all is always an error, since what it held is unknown.
"""

import collections
import contextlib
import dataclasses
import json
import threading
from collections.abc import Sequence

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import logging
from array_record.python import array_record_module

from rdlm import storage

METADATA_FILE = "metadata.json"
_RECORD_DTYPE = np.dtype("<i4")
ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """What a source returns in place of a record it cannot use (data.on_bad_record='skip')."""

    where: str  # 'FILE record i' or 'FILE row i (column ...)'
    reason: str  # what is wrong with it, e.g. 'cannot be read (RuntimeError: ...)'

    def describe(self) -> str:
        return f"{self.where} {self.reason}"


def check_on_bad_record(value: str) -> None:
    if value not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record={value!r} is not one of {ON_BAD_RECORD}.")


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: " + ((str(error).strip().splitlines() or [""])[0][:300])


def _skip_hint(on_bad_record: str) -> str:
    return "" if on_bad_record == "skip" else ", or set data.on_bad_record='skip' to leave such records out"


def _empty_shards(paths: list[str], sizes: list[int], on_bad_record: str) -> list[int]:
    """Indices of the non-empty shards; an empty one is an error, or passed over with a warning ('skip')."""
    for path, size in zip(paths, sizes):
        if size:
            continue
        if on_bad_record != "skip" and len(paths) > 1:
            raise ValueError(
                f"The shard {path} holds no records; remove it from data.paths or write it again"
                f"{_skip_hint(on_bad_record)}."
            )
        if len(paths) > 1:
            logging.warning("The shard %s holds no records; passing over it (data.on_bad_record='skip').", path)
    return [i for i, size in enumerate(sizes) if size or len(paths) == 1]


def resolve_paths(paths: str | Sequence[str], field: str = "data.paths") -> list[str]:
    """Expands a glob, a comma-separated list of globs or a list of them into sorted file paths."""
    patterns = paths.split(",") if isinstance(paths, str) else list(paths)
    patterns = [p.strip() for p in patterns if p and p.strip()]
    if not patterns:
        raise ValueError(f"{field} is empty; set it to a file, a glob or a list of them.")
    files = []
    for pattern in patterns:
        matches = storage.glob(pattern)
        if not matches:
            raise FileNotFoundError(
                f"{field}: {pattern!r} matches no file{storage.missing_reason(pattern)}; check the path or glob."
            )
        files.extend(matches)
    return files


def _id_error(where: str, value: int, vocab_size: int) -> ValueError:
    return ValueError(
        f"{where} {_id_reason(value, vocab_size)}; "
        "raise model.vocab_size above the corpus's largest id, or fix the corpus."
    )


def first_bad_id(ids: np.ndarray, vocab_size: int | None) -> int | None:
    """The index of the first id of `ids` outside [0, vocab_size), or None."""
    if vocab_size is None or not len(ids):
        return None
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    return int(bad[0]) if len(bad) else None


def check_ids(ids: np.ndarray, vocab_size: int | None, where) -> None:
    """Raises if an id of `ids` is outside [0, vocab_size); `where(i)` names the place of ids[i]."""
    i = first_bad_id(ids, vocab_size)
    if i is not None:
        raise _id_error(where(i), int(ids[i]), vocab_size)


def _id_reason(value: int, vocab_size: int) -> str:
    return f"holds token id {value}, outside [0, model.vocab_size={vocab_size})"


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
        self.write_record(encode_record(ids))

    def write_record(self, record: bytes) -> None:
        """Writes one already serialized record (e.g. rdlm.data.chat's ids + loss mask)."""
        self._writer.write(record)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayRecordSource:
    """Documents from native ArrayRecord shards, as int32 id arrays."""

    def __init__(self, paths: Sequence[str], vocab_size: int | None = None, on_bad_record: str = "error"):
        check_on_bad_record(on_bad_record)
        self._given, self._vocab_size, self._on_bad = list(paths), vocab_size, on_bad_record
        sizes = [self._num_records(p) for p in self._given]
        self._paths = [self._given[i] for i in _empty_shards(self._given, sizes, on_bad_record)]
        self._starts = np.concatenate([[0], np.cumsum([sizes[self._given.index(p)] for p in self._paths])])
        self._records = grain.sources.ArrayRecordDataSource(self._paths)

    @staticmethod
    def _num_records(path: str) -> int:
        try:
            reader = array_record_module.ArrayRecordReader(path)
            try:
                return reader.num_records()
            finally:
                reader.close()
        except Exception as e:  # noqa: BLE001 (array_record raises RuntimeError for every kind of damage)
            raise ValueError(
                f"The shard {path} is not a readable ArrayRecord file ({_first_line(e)}); write it again or remove "
                "it from data.paths."
            ) from None

    def __getstate__(self):
        return {"paths": self._given, "vocab_size": self._vocab_size, "on_bad_record": self._on_bad}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["vocab_size"], state.get("on_bad_record", "error"))

    def __len__(self) -> int:
        return len(self._records)

    def _where(self, index: int) -> str:
        """'FILE record i' for a global record index."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f"{self._paths[shard]} record {index - int(self._starts[shard])}"

    @staticmethod
    def _decode(record: bytes):
        """One record's document; a subclass may return a dict whose "ids" are checked."""
        return decode_record(record)

    def __getitem__(self, index: int):
        index = int(index)
        try:
            doc = self._decode(self._records[index])
        except Exception as e:  # noqa: BLE001 (a damaged chunk fails its hash check with a RuntimeError)
            return self._bad(BadRecord(self._where(index), f"cannot be read ({_first_line(e)})"))
        ids = doc["ids"] if isinstance(doc, dict) else doc
        bad = first_bad_id(ids, self._vocab_size)
        if bad is not None:
            if self._on_bad != "skip":
                raise _id_error(self._where(index), int(ids[bad]), self._vocab_size)
            return BadRecord(self._where(index), _id_reason(int(ids[bad]), self._vocab_size))
        return doc

    def _bad(self, record: BadRecord) -> BadRecord:
        if self._on_bad == "skip":
            return record
        raise ValueError(f"{record.describe()}; write the shard again{_skip_hint(self._on_bad)}.")

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
    _OPEN_FILES_PER_THREAD = 8

    def __init__(self, paths: Sequence[str], column: str = "input_ids", vocab_size: int | None = None,
                 on_bad_record: str = "error"):
        check_on_bad_record(on_bad_record)
        self._given, self._column, self._vocab_size, self._on_bad = list(paths), column, vocab_size, on_bad_record
        group_rows = [self._row_groups_of(path) for path in self._given]
        kept = _empty_shards(self._given, [sum(rows) for rows in group_rows], on_bad_record)
        self._paths = [self._given[i] for i in kept]
        self._groups = []  # (path index, row group index, first row of the group in its file) in order.
        sizes = []
        for i, rows in enumerate(group_rows[k] for k in kept):
            first = 0
            for g, n in enumerate(rows):
                self._groups.append((i, g, first))
                sizes.append(n)
                first += n
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._cache, self._lock, self._open = collections.OrderedDict(), threading.Lock(), threading.local()
        self._unreadable = {}  # row group -> why it cannot be read ('skip' only)

    def _row_groups_of(self, path: str) -> list[int]:
        """The row counts of a file's row groups; checks its column and (unless skipping) its id statistics."""
        with contextlib.ExitStack() as stack:
            remote = storage.local_path(path) is None
            try:
                meta = pq.ParquetFile(stack.enter_context(storage.open(path, "rb", random_access=True))
                                      if remote else storage.local_path(path))
            except (storage.NotFound, storage.AccessDenied):
                raise
            except (OSError, pa.ArrowException) as e:
                raise ValueError(
                    f"The shard {path} is not a readable parquet file ({_first_line(e)}); write it again or remove "
                    "it from data.paths."
                ) from None
            _check_column(path, meta.schema_arrow, self._column)
            for g in range(meta.metadata.num_row_groups):
                if self._on_bad != "skip":
                    _check_statistics(path, meta, g, self._column, self._vocab_size)
            return [meta.metadata.row_group(g).num_rows for g in range(meta.metadata.num_row_groups)]

    def __getstate__(self):
        return {"paths": self._given, "column": self._column, "vocab_size": self._vocab_size,
                "on_bad_record": self._on_bad}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["column"], state["vocab_size"], state.get("on_bad_record", "error"))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | str:
        """(offsets, values, {row in group: why it is bad}) of one row group, from the cache when possible; or,
        with on_bad_record='skip', why the whole group cannot be read."""
        with self._lock:
            if group in self._unreadable:
                return self._unreadable[group]
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
        file_index, row_group, first_row = self._groups[group]
        path = self._paths[file_index]
        try:
            table = self._reader(file_index).read_row_group(row_group, columns=[self._column])
        except (OSError, pa.ArrowException) as e:
            rows = f"rows {first_row}-{first_row + self._rows_in(group) - 1}"
            reason = f"cannot be read ({_first_line(e)})"
            if self._on_bad != "skip":
                raise ValueError(
                    f"{path} row group {row_group} ({rows}) {reason}; write the file again{_skip_hint(self._on_bad)}."
                ) from None
            with self._lock:
                self._unreadable[group] = f"(row group {row_group}) {reason}"
            return self._unreadable[group]
        offsets, values = _flatten_lists(table.column(0))

        def where(i: int) -> str:
            row = first_row + int(np.searchsorted(offsets, i, side="right")) - 1
            return f"{path} row {row} (column {self._column!r})"

        bad_rows = {}
        if self._on_bad != "skip":
            check_ids(values, self._vocab_size, where)
        elif self._vocab_size is not None:
            for row in range(len(offsets) - 1):
                ids = values[offsets[row]:offsets[row + 1]]
                i = first_bad_id(ids, self._vocab_size)
                if i is not None:
                    bad_rows[row] = _id_reason(int(ids[i]), self._vocab_size)
        with self._lock:
            self._cache[group] = offsets, values, bad_rows
            if len(self._cache) > self._CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return offsets, values, bad_rows

    def _rows_in(self, group: int) -> int:
        return int(self._starts[group + 1] - self._starts[group])

    def _reader(self, file_index: int) -> pq.ParquetFile:
        """This thread's reader of one file. grain reads from several threads, and a pyarrow reader over a gs://
        file object crashes when two threads share it; a few files stay open per thread, not one per file."""
        files = self._open.__dict__.setdefault("files", collections.OrderedDict())
        if file_index in files:
            files.move_to_end(file_index)
            return files[file_index]
        path = self._paths[file_index]
        source = storage.local_path(path) or storage.open(path, "rb", random_access=True)
        files[file_index] = pq.ParquetFile(source, page_checksum_verification=True)
        if len(files) > self._OPEN_FILES_PER_THREAD:
            files.popitem(last=False)
        return files[file_index]

    def __getitem__(self, index: int) -> np.ndarray | BadRecord:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Document {index} is out of range for {len(self)} documents.")
        group = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - int(self._starts[group])
        loaded = self._row_group(group)
        file_index, _, first_row = self._groups[group]
        where = f"{self._paths[file_index]} row {first_row + row} (column {self._column!r})"
        if isinstance(loaded, str):
            return BadRecord(where, loaded)
        offsets, values, bad_rows = loaded
        if row in bad_rows:
            return BadRecord(where, bad_rows[row])
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


def _check_statistics(path: str, meta: pq.ParquetFile, group: int, column: str, vocab_size: int | None) -> None:
    """Raises if a row group's min/max statistics (when written) put an id outside [0, vocab_size)."""
    if vocab_size is None:
        return
    row_group = meta.metadata.row_group(group)
    for c in range(row_group.num_columns):
        chunk = row_group.column(c)
        if chunk.path_in_schema.split(".")[0] != column or chunk.statistics is None:
            continue
        stats = chunk.statistics
        if not stats.has_min_max:
            continue
        for value in (stats.min, stats.max):
            if not 0 <= value < vocab_size:
                raise _id_error(f"{path} row group {group} (column {column!r}, by its statistics)", value, vocab_size)


def read_metadata(paths: Sequence[str]) -> dict | None:
    """Returns the `metadata.json` that `prepare` wrote beside the first shard, if there is one."""
    path = storage.path(paths[0]).parent / METADATA_FILE
    if not storage.exists(path):
        return None
    meta = json.loads(storage.read_text(path))
    tokenizer = meta.get("tokenizer")
    if tokenizer and not (tokenizer.startswith("/") or storage.is_remote(tokenizer)):
        meta["tokenizer"] = str(path.parent / tokenizer)
    return meta


def check_not_empty(source: Sequence, what: str) -> None:
    """Raises if `source` has no documents or only empty (or bad) ones (stops at the first non-empty one)."""
    if len(source) == 0:
        raise ValueError(f"{what} holds no documents; point it at a non-empty corpus.")
    for i in range(len(source)):
        doc = source[i]
        if not isinstance(doc, BadRecord) and len(doc["ids"] if isinstance(doc, dict) else doc):
            return
    raise ValueError(f"{what} holds {len(source)} documents but zero tokens; check the corpus.")
