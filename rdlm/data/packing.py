"""Packs token documents into fixed-length training rows, as a checkpointable grain transformation.

Each document becomes `[bos] + ids (+ [eos])` and is laid into rows of `seq_len + 1` token slots; a
row gives `inputs = slots[:-1]` and `targets = slots[1:]`. Documents are concatenated and split:
a row is filled to the last slot, and the part of a document that does not fit goes on in the next
row. Padding only appears in the last row of a finite stream.

Continuations (the rule for a document longer than what is left of a row):
- a continuation piece does NOT start with BOS: BOS marks the start of a document, and putting it
  before mid-document text would teach the model a false prior;
- it gets a fresh segment id and positions restarting at 0, like any other segment;
- it repeats the last token of the previous piece (an overlap of one token). That token was only a
  target in the previous row (the last slot is never an input), so every next-token pair of a
  document is trained exactly once and no pair is lost at a row boundary.

`weights[t]` is 1.0 exactly when `targets[t]` is the next token of the same document piece and that
token is in the loss (`loss_mask`); it is 0.0 on padding and where the target would be the first
token of the next document, so nothing leaks across documents or rows.
"""

import copy
from typing import Any

import grain
import numpy as np

Document = np.ndarray | dict[str, Any]


def _as_tokens(doc: Document, bos_id: int, eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Returns a document's tokens with BOS (and EOS) added and the per-token in-loss mask."""
    if isinstance(doc, dict):
        ids = np.asarray(doc["ids"], dtype=np.int32)
        mask = np.asarray(doc.get("loss_mask", np.ones(len(ids))), dtype=bool)
        if mask.shape != ids.shape:
            raise ValueError(f"A document's loss_mask has shape {mask.shape}, ids {ids.shape}.")
    else:
        ids = np.asarray(doc, dtype=np.int32)
        mask = np.ones(len(ids), dtype=bool)
    if len(ids) == 0:
        return ids, mask
    if ids[0] != bos_id:
        ids, mask = np.concatenate([[bos_id], ids]), np.concatenate([[False], mask])
    if eos_id is not None and ids[-1] != eos_id:
        ids, mask = np.concatenate([ids, [eos_id]]), np.concatenate([mask, [True]])
    return ids.astype(np.int32), mask


class _Row:
    """The slots of one row being filled: tokens, segment ids, positions and in-loss flags."""

    def __init__(self, seq_len: int, pad_id: int):
        self.tokens = np.full(seq_len + 1, pad_id, dtype=np.int32)
        self.segments = np.zeros(seq_len + 1, dtype=np.int32)
        self.positions = np.zeros(seq_len + 1, dtype=np.int32)
        self.in_loss = np.zeros(seq_len + 1, dtype=bool)
        self.used = 0
        self.num_segments = 0

    @property
    def space(self) -> int:
        return len(self.tokens) - self.used

    def add(self, tokens: np.ndarray, in_loss: np.ndarray) -> None:
        """Appends one segment (a document or a piece of one)."""
        end = self.used + len(tokens)
        self.num_segments += 1
        self.tokens[self.used:end] = tokens
        self.segments[self.used:end] = self.num_segments
        self.positions[self.used:end] = np.arange(len(tokens), dtype=np.int32)
        self.in_loss[self.used:end] = in_loss
        self.used = end

    def to_example(self) -> dict[str, np.ndarray]:
        """Returns the shifted inputs/targets view with per-target weights."""
        same_doc = (self.segments[:-1] == self.segments[1:]) & (self.segments[:-1] != 0)
        return {
            "inputs": self.tokens[:-1],
            "targets": self.tokens[1:],
            "segment_ids": self.segments[:-1],
            "positions": self.positions[:-1],
            "weights": (same_doc & self.in_loss[1:]).astype(np.float32),
        }


class PackIterDataset(grain.IterDataset):
    """Packs a stream of documents (id arrays or dicts with `ids` and `loss_mask`) into rows."""

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        seq_len: int,
        bos_id: int,
        eos_id: int | None = None,
        pad_id: int = 0,
    ):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"data.seq_len must be at least 1, got {seq_len}.")
        self._options = dict(seq_len=seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)

    def __iter__(self) -> "PackDatasetIterator":
        return PackDatasetIterator(self._parent.__iter__(), **self._options)

    def __str__(self) -> str:
        return f"PackIterDataset({self._options})"


class PackDatasetIterator(grain.DatasetIterator):
    """Iterator of `PackIterDataset`; its state is the parent's state plus an offset.

    Between rows the only carried-over data is the unfinished document, so the state is the parent
    state from just before that document was read and the offset to resume it at (-1 for none).
    Restoring re-reads that one document, which makes resumption exact and the state tiny.
    """

    def __init__(self, parent, *, seq_len: int, bos_id: int, eos_id: int | None, pad_id: int):
        super().__init__(parent)
        self._seq_len, self._bos_id, self._eos_id, self._pad_id = seq_len, bos_id, eos_id, pad_id
        self._pending = None  # (tokens, in_loss) of the unfinished document.
        self._offset = -1
        self._state_before_pending = None

    def _next_document(self) -> bool:
        """Reads the next non-empty document into `_pending`; False when the parent is exhausted."""
        while True:
            state = self._parent.get_state()
            try:
                doc = next(self._parent)
            except StopIteration:
                return False
            tokens, in_loss = _as_tokens(doc, self._bos_id, self._eos_id)
            if len(tokens) > 1:
                self._pending, self._offset = (tokens, in_loss), 0
                self._state_before_pending = copy.deepcopy(state)
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        row = _Row(self._seq_len, self._pad_id)
        while row.space > 0:
            if self._pending is None and not self._next_document():
                break
            tokens, in_loss = self._pending
            end = self._offset + row.space
            row.add(tokens[self._offset:end], in_loss[self._offset:end])
            if end >= len(tokens):
                self._pending, self._offset = None, -1
            else:
                self._offset = end - 1
        if row.used == 0:
            raise StopIteration
        return row.to_example()

    def get_state(self) -> dict[str, Any]:
        if self._pending is None:
            return {"parent": self._parent.get_state(), "offset": -1}
        return {"parent": self._state_before_pending, "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._offset = None, -1
        if state["offset"] >= 0:
            if not self._next_document():
                raise ValueError("The saved data iterator state points past the end of the data.")
            self._offset = state["offset"]


def pack_documents(docs: list[Document], **options) -> list[dict[str, np.ndarray]]:
    """Packs an in-memory list of documents in order (for evaluation sets and tests)."""
    stream = grain.MapDataset.source(docs).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return list(PackIterDataset(stream, **options))
