"""Chat data: conversations read from JSONL, rendered by huginn's template, tokenized with a per-token loss mask.

A conversation file holds one JSON object per line, as the Hugging Face chat datasets store them:
`{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}`. Roles are
system, user and assistant (or Huginn); every conversation needs an assistant turn.

`ChatTokenizer` turns a conversation into ids through rdlm.data.chat_template, for either kind of tokenizer:
- huginn-0125's `tokenizer.json` (the `tokenizers` package): the template's special tokens are its own;
- a SentencePiece model: BOS and end of text are its <s> and </s>, and <|begin_header|>, <|end_header|> and
  <|end_turn|> must be pieces of it. rdlm trains every tokenizer with them (rdlm.data.tokenizer); a model
  without them is refused in one sentence.
The loss mask is the reference's assistant mask: a token is trained on when it overlaps an assistant's
`{% generation %}` span (its content and its <|end_turn|>), or every token with `train_on="all"`.

Shards (`python -m rdlm.data.prepare --format=chat`) hold one record per conversation: its n ids as int32
little-endian, then n loss-mask bytes; `ChatRecordSource` reads them as `{"ids", "loss_mask"}` documents,
which the packer keeps apart (own segment id, positions from 0) with their masks.
"""

import json
from collections.abc import Iterator, Sequence

import numpy as np

from rdlm import storage
from rdlm.data import chat_template as template
from rdlm.data import sources

TRAIN_ON = ("assistant", "all")
TOKENIZER_JSON = "tokenizer.json"
# What travels with a tokenizer.json (huginn-0125's settings and stop tokens).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_RECORD_IDS = np.dtype("<i4")


def _conversation(path, line_no: int, line: str) -> list[dict]:
    """The messages of one JSONL line, or one sentence naming the file and line."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg}); each line must be one conversation object.") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} has no 'messages' list; a conversation is "
                         '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}.')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"{where}: message {i} must be an object with a 'role' and a string 'content'.")
        if m["role"] not in template.ROLES:
            raise ValueError(f"{where}: message {i} has the unknown role {m['role']!r}; use one of "
                             f"{', '.join(template.ROLES)}.")
    if not any(m["role"] in template.ASSISTANT_ROLES for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn, so nothing in it would be trained on; "
                         "add one or drop the line.")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(files: Sequence[str]) -> Iterator[list[dict]]:
    """Yields the messages of every conversation in JSONL `files` (local or gs://), checked line by line."""
    for path in files:
        with storage.open(path, "r") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _conversation(path, line_no, line)


class ChatTokenizer:
    """Conversations -> (ids, loss mask) with one tokenizer: huginn's tokenizer.json or a SentencePiece model."""

    def __init__(self, tokenizer, where: str):
        import tokenizers

        self._hf = isinstance(tokenizer, tokenizers.Tokenizer)
        self.tokenizer, self.where = tokenizer, where
        self.special_ids = self._hf_ids() if self._hf else self._sentencepiece_ids()
        missing = [name for name, i in self.special_ids.items() if i is None]
        if missing:
            needed = (template.HUGINN_SPECIALS[n] for n in missing) if self._hf else template.SENTENCEPIECE_CHAT_PIECES
            raise ValueError(
                f"The tokenizer {where} has no huginn chat tokens ({', '.join(needed)} missing), so conversations "
                "cannot be rendered with huginn's template; use huginn-0125's tokenizer.json or a SentencePiece "
                "model trained by rdlm (rdlm.data.prepare or the built-in corpus), which has them."
            )
        if self._hf:
            self.special_text = {n: template.HUGINN_SPECIALS[n] for n in template.TEMPLATE_SPECIALS}
        else:  # <s> and </s> are control ids, not text: a text rendering leaves them to the encoder
            self.special_text = {n: "" if n in (template.BOS, template.END_TEXT) else template.HUGINN_SPECIALS[n]
                                 for n in template.TEMPLATE_SPECIALS}

    @classmethod
    def from_file(cls, path) -> "ChatTokenizer":
        """A tokenizer.json (huginn's, through `tokenizers`) or a SentencePiece .model, local or gs://."""
        path = storage.path(path)
        if not storage.is_file(path):
            raise FileNotFoundError(f"Tokenizer file {path} does not exist{storage.missing_reason(path)}; pass a "
                                    "tokenizer.json or a SentencePiece .model (--tokenizer).")
        if path.suffix == ".json":
            import tokenizers

            return cls(tokenizers.Tokenizer.from_str(storage.read_text(path)), str(path))
        from rdlm.data.tokenizer import Tokenizer

        return cls(Tokenizer.from_file(path), str(path))

    def _hf_ids(self) -> dict[str, int | None]:
        return {n: self.tokenizer.token_to_id(template.HUGINN_SPECIALS[n]) for n in template.TEMPLATE_SPECIALS}

    def _sentencepiece_ids(self) -> dict[str, int | None]:
        sp = self.tokenizer.processor
        ids = {template.BOS: sp.bos_id(), template.END_TEXT: sp.eos_id()}
        for name in (template.BEGIN_HEADER, template.END_HEADER, template.END_TURN):
            piece = template.HUGINN_SPECIALS[name]
            i = sp.piece_to_id(piece)
            ids[name] = i if sp.id_to_piece(i) == piece else None
        return {n: (i if i is not None and i >= 0 else None) for n, i in ids.items()}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True) if self._hf else self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.special_ids[template.BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[template.END_TEXT]

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.token_to_id(template.HUGINN_SPECIALS["pad"]) if self._hf else self.tokenizer.pad_id
        return pad if pad is not None and pad >= 0 else 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(sorted({self.eos_id, self.special_ids[template.END_TURN]}))

    def _encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, end offset of each token); offsets count characters (tokenizers) or UTF-8 bytes (SentencePiece)."""
        if self._hf:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            return list(enc.ids), [end for _, end in enc.offsets]
        pieces = self.tokenizer.processor.encode(text, out_type="proto").pieces
        return [p.id for p in pieces], [p.end for p in pieces]

    def encode(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
               train_on: str = "assistant") -> tuple[np.ndarray, np.ndarray]:
        """(int32 ids, bool loss mask) of a conversation; the mask covers the assistant spans (or all tokens)."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on={train_on!r} must be one of {TRAIN_ON}.")
        ids, mask = [], []
        for piece in template.render(messages, add_generation_prompt):
            if piece.special:
                ids.append(self.special_ids[piece.text])
                mask.append(piece.trained_from is not None)
                continue
            piece_ids, ends = self._encode_text(piece.text)
            start = piece.trained_from
            if start is not None and not self._hf:
                start = len(piece.text[:start].encode("utf-8"))
            ids += piece_ids
            mask += [start is not None and end > start for end in ends]
        mask = np.ones(len(ids), bool) if train_on == "all" else np.asarray(mask, bool)
        return np.asarray(ids, np.int32), mask

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The ids that ask for the assistant's next turn (the template's generation prompt)."""
        return self.encode(messages, add_generation_prompt=True)[0].tolist()

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one string that this tokenizer encodes back to `encode`'s ids (after BOS)."""
        return template.to_text(template.render(messages, add_generation_prompt), self.special_text)


def copy_tokenizer_json(source, directory) -> None:
    """Copies a tokenizer.json and the companion files beside it into `directory` (local or gs://)."""
    source, directory = storage.path(source), storage.path(directory)
    storage.copy(source, directory / TOKENIZER_JSON)
    for name in TOKENIZER_COMPANIONS:
        if storage.exists(source.parent / name):
            storage.copy(source.parent / name, directory / name)


def encode_record(ids: np.ndarray, loss_mask: np.ndarray) -> bytes:
    """One chat record: the ids as int32 little-endian, then one byte per id (1 = in the loss)."""
    return np.asarray(ids, _RECORD_IDS).tobytes() + np.asarray(loss_mask, np.uint8).tobytes()


def decode_record(record: bytes) -> dict[str, np.ndarray]:
    n = len(record) // (_RECORD_IDS.itemsize + 1)
    ids = np.frombuffer(record, _RECORD_IDS, count=n).astype(np.int32)
    mask = np.frombuffer(record, np.uint8, offset=n * _RECORD_IDS.itemsize).astype(bool)
    return {"ids": ids, "loss_mask": mask}


class ChatRecordSource(sources.ArrayRecordSource):
    """Conversations from chat shards, as `{"ids", "loss_mask"}` documents."""

    @staticmethod
    def _decode(record: bytes) -> dict[str, np.ndarray]:
        return decode_record(record)

    def __repr__(self) -> str:
        return f"ChatRecordSource({len(self)} conversations)"


if __name__ == "__main__":
    import sys

    print("rdlm.data.chat is the chat data format, not a command; prepare conversations with\n"
          "  python -m rdlm.data.prepare --format=chat --input='conv/*.jsonl' --output_dir=data/chat", file=sys.stderr)
    sys.exit(2)
