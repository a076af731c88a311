"""A picklable SentencePiece tokenizer, trained in memory with settings that suit source code."""

import io
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

from rdlm import storage
from rdlm.data import chat_template

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Indentation runs, written with U+2581 (SentencePiece's space) so they become single pieces.
INDENT_PIECES = tuple("\u2581" * n for n in (2, 4, 8, 12, 16))
# Pieces every tokenizer rdlm trains gets as whole tokens: huginn's chat tokens (ids 4-6), then indentation.
USER_PIECES = chat_template.SENTENCEPIECE_CHAT_PIECES + INDENT_PIECES
# SentencePiece drops training sentences longer than this many bytes; longer texts are cut by line.
_MAX_SENTENCE_BYTES = 4192
# 4 special pieces, 256 byte-fallback pieces, the user pieces and a few learned ones.
MIN_VOCAB_SIZE = 4 + 256 + len(USER_PIECES) + 16


class Tokenizer:
    """SentencePiece wrapper that holds the serialized model and loads the processor lazily.

    It pickles as the model bytes, so it can go into grain worker processes.
    """

    def __init__(self, model_proto: bytes):
        self._model_proto = bytes(model_proto)
        self._processor = None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a `.model` file (local or gs://) written by SentencePiece or by `save`."""
        if not storage.is_file(path):
            raise FileNotFoundError(
                f"Tokenizer file {str(path)!r} does not exist{storage.missing_reason(path)}; pass the path of a "
                "SentencePiece .model file (data.tokenizer or --tokenizer)."
            )
        return cls(storage.read_bytes(path))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model so that `from_file` (or any SentencePiece tool) can read it."""
        storage.write_bytes(path, self._model_proto)

    @property
    def model_proto(self) -> bytes:
        return self._model_proto

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        if self._processor is None:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        return self._processor

    def __getstate__(self):
        return {"model_proto": self._model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text`, without BOS or EOS."""
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in one call (SentencePiece runs the batch in C++)."""
        return self.processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; special ids (BOS, EOS, pad) decode to nothing.

        Ids beyond this vocabulary (a model's padded vocab can emit them) decode as the unknown piece.
        """
        size = self.vocab_size
        return self.processor.decode([int(i) if 0 <= int(i) < size else UNK_ID for i in ids])

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()


def _sentences(texts: Iterable[str], max_bytes: int, total_bytes: float) -> Iterator[str]:
    """Cuts texts at line ends into pieces SentencePiece will not skip, until `total_bytes`."""
    for text in texts:
        piece = b""
        for line in text.encode("utf-8", errors="replace").splitlines(keepends=True):
            if piece and len(piece) + len(line) > max_bytes:
                yield piece.decode("utf-8")
                total_bytes -= len(piece)
                piece = b""
            piece += line
        if piece:
            yield piece.decode("utf-8")
            total_bytes -= len(piece)
        if total_bytes <= 0:
            return


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_mb: float = 0.0,
                    num_threads: int = 2) -> Tokenizer:
    """Trains a byte-fallback BPE model on `texts` in memory (options chosen for code).

    Text round-trips exactly: identity normalization, no extra-whitespace removal, no dummy prefix
    (so `encode(a) + encode(b)` decodes to `a + b`), digits split, unknown characters as bytes.
    Ids: pad 0, BOS 1, EOS 2, unk 3, then huginn's chat tokens <|begin_header|>, <|end_header|>, <|end_turn|>
    (so chat data renders with huginn's template, rdlm.data.chat). Training stops reading `texts` after
    `max_mb` MB (0: all).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"Tokenizer vocab_size={vocab_size} is too small: byte fallback alone needs 260 ids; "
            f"use at least {MIN_VOCAB_SIZE}."
        )
    model = io.BytesIO()
    sentences = _sentences(texts, _MAX_SENTENCE_BYTES - 96, max_mb * 1e6 or math.inf)
    first = next(sentences, None)
    if first is None:
        raise ValueError("The tokenizer's training text is empty; give it a non-empty corpus.")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=list(USER_PIECES),
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"Training the tokenizer with vocab_size={vocab_size} failed: {e}") from e
    return Tokenizer(model.getvalue())


def check_vocab(tokenizer_vocab: int | None, model_vocab: int) -> None:
    """Raises if the tokenizer can produce ids the model's embedding table does not have.

    `None` (a corpus of bare ids, with no tokenizer or metadata) passes: the data sources check every id.
    """
    if tokenizer_vocab is not None and tokenizer_vocab > model_vocab:
        raise ValueError(
            f"The tokenizer has {tokenizer_vocab} tokens but model.vocab_size is {model_vocab}; "
            f"set model.vocab_size to at least {tokenizer_vocab} or use a smaller tokenizer."
        )
