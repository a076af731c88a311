"""Training and validation input pipelines: documents -> shuffle -> one packed stream per batch row.

The training iterator is a grain `DatasetIterator`: `get_state()` returns a small JSON-able dict
and `set_state()` on a fresh iterator built from the same config, seed and process layout resumes
exactly where the saved one was.

With `data.on_bad_record='skip'`, records a source cannot use (`sources.BadRecord`) are left out before
packing; each training batch then carries `bad_records` ([rows] int32), how many each row's stream
skipped while it was read, exact across resumes (the trainer pops it and logs the count).
"""

import dataclasses
import itertools

import grain
import numpy as np
from absl import flags, logging

from rdlm.data import builtin, chat, packing, sources
from rdlm.data import config as config_lib
from rdlm.data import tokenizer as tokenizer_lib

SOURCES = ("builtin", "arrayrecord", "parquet")
BAD_RECORDS_KEY = "bad_records"
_EVAL_SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the packer needs; `eos` is None when documents get no EOS."""

    bos: int
    eos: int | None
    pad: int


def builtin_corpus(config) -> builtin.BuiltinCorpus:
    """Returns the built-in corpus for this config (built once per process)."""
    cfg = config_lib.data_section(config)
    return builtin.build(builtin.BuiltinSpec.from_config(cfg), cfg.cache_dir)


def _metadata(cfg) -> dict:
    """Returns the metadata.json beside ArrayRecord shards, or {}."""
    if cfg.source != "arrayrecord":
        return {}
    return sources.read_metadata(sources.resolve_paths(cfg.paths)) or {}


def tokenizer_file(config) -> str | None:
    """The path of the corpus's tokenizer file: data.tokenizer, else the shards' metadata (None for built-in)."""
    cfg = config_lib.data_section(config)
    return cfg.tokenizer or (None if cfg.source == "builtin" else _metadata(cfg).get("tokenizer")) or None


def load_tokenizer(config) -> tokenizer_lib.Tokenizer | None:
    """Returns the corpus's SentencePiece tokenizer: data.tokenizer, the shards' metadata, or the built-in one.

    A tokenizer.json (huginn's, for chat shards) gives None: the data is token ids, its special ids are in the
    metadata, and rdlm.train keeps the file itself (`tokenizer_file`).
    """
    cfg = config_lib.data_section(config)
    if cfg.source == "builtin" and not cfg.tokenizer:
        return builtin_corpus(cfg).tokenizer
    path = tokenizer_file(cfg)
    return tokenizer_lib.Tokenizer.from_file(path) if path and not path.endswith(".json") else None


def corpus_vocab_size(config) -> int | None:
    """Returns the vocabulary size of the corpus's tokenizer (or metadata.json), None if unknown.

    The trainer checks it with `tokenizer.check_vocab(corpus_vocab_size(cfg), model_vocab_size)`.
    """
    cfg = config_lib.data_section(config)
    tok = load_tokenizer(cfg)
    return tok.vocab_size if tok is not None else _metadata(cfg).get("vocab_size")


def special_ids(config, tokenizer: tokenizer_lib.Tokenizer | None = None) -> SpecialIds:
    """Resolves BOS/EOS/pad: the data.*_id field if set, else the tokenizer (`tokenizer`, default the
    corpus's), else metadata.json."""
    cfg = config_lib.data_section(config)
    tok, meta = load_tokenizer(cfg) if tokenizer is None else tokenizer, _metadata(cfg)

    def pick(name: str) -> int | None:
        value = cfg[f"{name}_id"]
        if value < 0 and tok is not None:
            value = getattr(tok, f"{name}_id")
        if value < 0:
            value = meta.get(f"{name}_id", -1)
        return value if value >= 0 else None

    bos, eos, pad = pick("bos"), pick("eos"), pick("pad")
    for name, value, needed in (("bos", bos, True), ("eos", eos, cfg.append_eos)):
        if needed and value is None:
            raise ValueError(
                f"No {name.upper()} id is known for data.paths={cfg.paths!r}: set data.tokenizer "
                f"or data.{name}_id" + ("" if name == "bos" else ", or data.append_eos=False") + "."
            )
    # Padding slots always get weight 0, so any id works when none is known.
    return SpecialIds(bos=bos, eos=eos if cfg.append_eos else None, pad=0 if pad is None else pad)


def model_vocab_size(config) -> int | None:
    """`model.vocab_size` of a full training config (the bound every token id must stay below); None for a
    bare `data` section."""
    return int(config.model.vocab_size) if "data" in config and "model" in config else None


def _check_special_ids(ids: SpecialIds, vocab_size: int | None) -> None:
    for name, value in (("bos", ids.bos), ("eos", ids.eos), ("pad", ids.pad)):
        if vocab_size is not None and value is not None and not 0 <= value < vocab_size:
            raise ValueError(
                f"The {name.upper()} id {value} (data.{name}_id or the tokenizer's) is outside [0, "
                f"model.vocab_size={vocab_size}); set data.{name}_id below model.vocab_size."
            )


def _file_source(cfg, paths, field: str, vocab_size: int | None):
    """Opens the configured kind of file source; ids outside [0, vocab_size) are refused when read."""
    files = sources.resolve_paths(paths, field)
    if cfg.source == "arrayrecord":
        chat_shards = (sources.read_metadata(files) or {}).get("loss_mask")  # rdlm.data.prepare --format=chat
        return (chat.ChatRecordSource if chat_shards else sources.ArrayRecordSource)(files, vocab_size, cfg.on_bad_record)
    return sources.ParquetSource(files, cfg.parquet_column, vocab_size, cfg.on_bad_record)


def documents(config, split: str) -> grain.MapDataset:
    """Returns the documents of `split` ('train' or 'eval') as a grain MapDataset.

    Given a full training config, file sources refuse token ids at or above `model.vocab_size`.
    """
    cfg, vocab_size = config_lib.data_section(config), model_vocab_size(config)
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not one of {SOURCES}.")
    sources.check_on_bad_record(cfg.on_bad_record)
    if cfg.source == "builtin":
        corpus = builtin_corpus(cfg)
        ds = grain.MapDataset.source(corpus.train_docs if split == "train" else corpus.eval_docs)
        what = f"The built-in corpus ({split} split)"
    elif split == "eval" and cfg.eval_paths:
        ds = grain.MapDataset.source(_file_source(cfg, cfg.eval_paths, "data.eval_paths", vocab_size))
        what = f"data.eval_paths={cfg.eval_paths!r}"
    else:
        ds = grain.MapDataset.source(_file_source(cfg, cfg.paths, "data.paths", vocab_size))
        what = f"data.paths={cfg.paths!r}"
        sources.check_not_empty(ds, what)
        held = 0 if cfg.eval_paths else cfg.eval_documents
        if split == "eval" and held <= 0:
            raise ValueError("No validation data: set data.eval_paths or data.eval_documents > 0.")
        if held >= len(ds):
            raise ValueError(
                f"data.eval_documents={held} holds out all {len(ds)} documents of {what}; "
                "lower it or set data.eval_paths."
            )
        ds = ds[held:] if split == "train" else ds[:held]
    sources.check_not_empty(ds, what)
    return ds


def _pack_and_batch(ds: grain.MapDataset, cfg, batch_size: int, *, drop_remainder: bool,
                    read_threads: int, tokenizer=None) -> grain.IterDataset:
    """Streams documents through the packer and stacks rows into batches."""
    if batch_size < 1:
        raise ValueError(f"The per-process batch size must be at least 1, got {batch_size}.")
    ids = special_ids(cfg, tokenizer)
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)
    rows = packing.PackIterDataset(
        SkipBadRecords(ds.to_iter_dataset(options)),
        seq_len=cfg.seq_len, bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad,
    )
    return rows.batch(batch_size, drop_remainder=drop_remainder)


def _host_slice(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """Returns this process's disjoint share of the documents."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} documents cannot be split among {process_count} processes.")
    return ds[process_index::process_count]


class SkipBadRecords(grain.IterDataset):
    """Leaves out the `sources.BadRecord`s of a document stream, counting them (the count is in its state)."""

    def __iter__(self) -> "SkipBadRecordsIterator":
        return SkipBadRecordsIterator(iter(self._parent))


class SkipBadRecordsIterator(grain.DatasetIterator):
    """Its state is the parent's plus the number of bad records skipped so far, so a resume counts each once."""

    def __init__(self, parent):
        super().__init__(parent)
        self.skipped = 0

    def __next__(self):
        while True:
            doc = next(self._parent)
            if not isinstance(doc, sources.BadRecord):
                return doc
            self.skipped += 1
            logging.warning("Skipped a bad record: %s (data.on_bad_record='skip').", doc.describe())

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self.skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.skipped = int(state["skipped"])


class RowStreams(grain.IterDataset):
    """Batches whose row j comes from its own packed stream of documents; its state is the list of stream states."""

    def __init__(self, documents: list[grain.IterDataset], pack_options: dict):
        super().__init__(documents)
        self._documents, self._pack_options = documents, pack_options

    def __iter__(self) -> "RowStreamsIterator":
        skips = [SkipBadRecordsIterator(iter(d)) for d in self._documents]
        return RowStreamsIterator([packing.PackDatasetIterator(s, **self._pack_options) for s in skips], skips)


class RowStreamsIterator(grain.DatasetIterator):
    """Stacks one row from each stream; stops when any stream is exhausted (finite data.num_epochs).

    Each batch's `bad_records` holds, per row, the bad records its stream skipped since the previous
    batch: the difference of the streams' skip counts, which the state keeps as of the last batch.
    """

    def __init__(self, iterators, skips):
        super().__init__(iterators)
        self._iterators, self._skips = iterators, skips
        self._counted = [0] * len(skips)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(it) for it in self._iterators]
        batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        now = [s.skipped for s in self._skips]
        batch[BAD_RECORDS_KEY] = np.asarray(now, np.int32) - np.asarray(self._counted, np.int32)
        self._counted = now
        return batch

    def get_state(self) -> dict:
        return {"streams": [it.get_state() for it in self._iterators], "bad_records_counted": list(self._counted)}

    def set_state(self, state: dict) -> None:
        if len(state["streams"]) != len(self._iterators):
            raise ValueError(
                f"The saved data iterator has {len(state['streams'])} row streams but this process has "
                f"{len(self._iterators)}; resume with the same train.batch_size and process count."
            )
        for it, stream_state in zip(self._iterators, state["streams"]):
            it.set_state(stream_state)
        self._counted = list(state.get("bad_records_counted", [s.skipped for s in self._skips]))


def make_train_iterator(config, *, process_index: int, process_count: int, seed: int,
                        batch_size_per_process: int) -> grain.DatasetIterator:
    """Returns an endless (or `data.num_epochs`-long) checkpointable iterator of packed batches.

    Row j of the global batch is its own stream: documents j, j + B, j + 2B, ... of the shuffled
    corpus (B = global rows), packed in order, so a document that does not fit goes on in the same
    row of the next batch. Process i owns rows [i * b, (i + 1) * b): the global batch is the same
    whatever the number of processes, and each host reads only its own documents.

    Each batch is a dict of numpy arrays with leading dim `batch_size_per_process`: `inputs`,
    `targets`, `segment_ids`, `positions` (int32, [B, seq_len]), `weights` (float32) and `bad_records`
    (int32, [B]: records left out under data.on_bad_record='skip'; not a model input).
    """
    cfg = config_lib.data_section(config)
    if batch_size_per_process < 1:
        raise ValueError(f"The per-process batch size must be at least 1, got {batch_size_per_process}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
    rows = batch_size_per_process * process_count
    ds = documents(config, "train").seed(seed).shuffle()
    if len(ds) < rows:
        raise ValueError(f"{len(ds)} training documents cannot fill {rows} row streams; lower train.batch_size.")
    ids = special_ids(cfg)
    _check_special_ids(ids, model_vocab_size(config))
    threads = 0 if cfg.source == "builtin" else cfg.read_threads
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * threads))
    streams = [
        ds[j::rows].repeat(cfg.num_epochs or None).to_iter_dataset(options)
        for j in range(process_index * batch_size_per_process, (process_index + 1) * batch_size_per_process)
    ]
    it = RowStreams(streams, dict(seq_len=cfg.seq_len, bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad))
    if cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain workers read absl flags (e.g. in a notebook).
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(it)


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a batch to `rows` rows with zero-weight rows of segment 0 (they add to no metric)."""
    return {k: np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def make_eval_batches(config, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      num_batches: int | None = None, tokenizer=None) -> list[dict[str, np.ndarray]]:
    """Returns the fixed validation batches of this process, the same on every call.

    Every process gets exactly `num_batches` (default `data.eval_batches`) full batches, padded with
    zero-weight rows where its share of the held-out documents runs out, so hosts stay in step.
    With `tokenizer` (a run's saved one) built-in documents are encoded with it and no tokenizer is
    built from the corpus.
    """
    cfg = config_lib.data_section(config)
    num_batches = cfg.eval_batches if num_batches is None else num_batches
    if tokenizer is not None and cfg.source == "builtin":
        ds = grain.MapDataset.source(builtin.eval_documents(cfg, tokenizer))
    else:
        ds = documents(config, "eval")
    ds = ds.shuffle(seed=_EVAL_SHUFFLE_SEED)
    ds = _host_slice(ds, process_index, process_count)
    it = _pack_and_batch(ds, cfg, batch_size, drop_remainder=False, read_threads=0, tokenizer=tokenizer)
    batches = list(itertools.islice(iter(it), num_batches))
    if not batches:
        raise ValueError(f"The validation documents of process {process_index} are empty.")
    batches[-1] = _pad_rows(batches[-1], batch_size)
    empty = {k: v[:0] for k, v in batches[-1].items()}
    return batches + [_pad_rows(empty, batch_size) for _ in range(num_batches - len(batches))]
