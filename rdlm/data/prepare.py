r"""Tokenizes text, JSONL or chat conversations into ArrayRecord shards with a metadata.json.

    python -m rdlm.data.prepare --input='corpus/*.jsonl' --output_dir=/data/mine \
        [--tokenizer=model.spm] [--vocab_size=8192] [--num_shards=4]
    python -m rdlm.data.prepare --format=chat --input='conv/*.jsonl' --output_dir=/data/chat \
        [--tokenizer=huginn-0125/tokenizer.json | --tokenizer=runs/tiny/tokenizer.model] [--train_on=all]

Text: a `.jsonl` file holds one document per line (the `--text_field` of each JSON object); any other
file is one document. Chat (`--format=chat`): each line is a conversation, `{"messages": [{"role", "content"},
...]}`, rendered with huginn's template (rdlm.data.chat) with a per-token loss mask: the assistant's tokens, or
all with `--train_on=all`. Without `--tokenizer`, a SentencePiece model (with huginn's chat tokens) is trained
on the input and saved as `tokenizer.model` beside the shards; a tokenizer.json is copied there with its
companion files. Then train with `data.source='arrayrecord'` and `data.paths='/data/mine/*.array_record'`.
Input and output may be local or gs:// (shards for gs:// are written locally, then uploaded: the ArrayRecord
writer only writes local files).
"""

import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence

from absl import flags

from rdlm import cli, storage
from rdlm.data import chat, sources
from rdlm.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"
FORMATS = ("text", "chat")


def read_documents(files: Sequence[str], text_field: str = "text") -> Iterator[str]:
    """Yields the documents of text files (one each) and JSONL files (one per line); text must be UTF-8."""
    for path in files:
        if not path.endswith(".jsonl"):
            data = storage.read_bytes(path)
            yield _utf8(data, path, _line_of(data, 0))
            continue
        with storage.open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = _utf8(raw, path, lambda _: line_no)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{line_no} is not a JSON object with a {text_field!r} field "
                        f"(--text_field); fix the line or pass the right field ({e!r})."
                    ) from e
                yield text


def _line_of(data: bytes, _):
    """Line number (1-based) of a byte offset of `data`."""
    return lambda offset: data.count(b"\n", 0, offset) + 1


def _utf8(data: bytes, path: str, line_of) -> str:
    """`data` decoded as UTF-8, or one sentence naming the file, line and byte that are not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line_of(e.start)} ({e.reason}); "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of --input."
        ) from None


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    """Groups an iterator into lists of `size` (the last one may be shorter)."""
    while batch := list(itertools.islice(items, size)):
        yield batch


def prepare(
    input_paths: str | Sequence[str],
    output_dir: str,
    *,
    tokenizer: str = "",
    vocab_size: int = 8192,
    num_shards: int = 1,
    text_field: str = "text",
    tokenizer_train_mb: float = 100.0,
) -> dict:
    """Writes the shards and metadata.json for the input files; returns the metadata."""
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards} must be at least 1.")
    files = sources.resolve_paths(input_paths, "--input")
    if not any(text.strip() for text in read_documents(files, text_field)):
        raise ValueError(f"--input={input_paths!r} holds no text to tokenize; check the files.")
    out = storage.makedirs(output_dir)
    if tokenizer:
        tok, tok_path = tokenizer_lib.Tokenizer.from_file(tokenizer), str(storage.path(tokenizer))
    else:
        unreadable = []  # a bad file found while SentencePiece reads: its own sentence, not SentencePiece's

        def texts():
            try:
                yield from read_documents(files, text_field)
            except ValueError as e:
                unreadable.append(e)

        try:
            tok = tokenizer_lib.train_tokenizer(texts(), vocab_size, max_mb=tokenizer_train_mb)
        finally:
            if unreadable:
                raise unreadable[0]
        tok.save(out / TOKENIZER_FILE)
        tok_path = TOKENIZER_FILE  # Relative: the directory can be moved as a whole.

    num_docs = num_tokens = 0

    def records():
        nonlocal num_docs, num_tokens
        for texts in _batched(read_documents(files, text_field), 256):
            for ids in tok.encode_batch(texts):
                if ids:
                    num_docs, num_tokens = num_docs + 1, num_tokens + len(ids)
                    yield sources.encode_record(ids)

    names = _write_shards(out, records(), num_shards)
    metadata = {
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok_path,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "shards": names,
        "format": "one record per document: int32 little-endian token ids, no BOS",
    }
    storage.write_text(out / sources.METADATA_FILE, json.dumps(metadata, indent=2))
    return metadata


def _write_shards(out, records, num_shards: int) -> list[str]:
    """Writes serialized records round-robin into `num_shards` ArrayRecord shards; returns their names."""
    names = [f"data-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    with contextlib.ExitStack() as stack:
        locals_ = [stack.enter_context(storage.local_file(out / name)) for name in names]
        writers = [stack.enter_context(sources.ShardWriter(path)) for path in locals_]
        for i, record in enumerate(records):
            writers[i % num_shards].write_record(record)
    return names


def _chat_tokenizer(files, tokenizer: str, out, vocab_size: int, train_mb: float) -> tuple[chat.ChatTokenizer, str]:
    """The chat tokenizer and the path metadata.json records for it (relative when it lives beside the shards)."""
    if not tokenizer:
        texts = ("\n\n".join(m["content"] for m in msgs) for msgs in chat.read_conversations(files))
        tok = tokenizer_lib.train_tokenizer(texts, vocab_size, max_mb=train_mb)
        tok.save(out / TOKENIZER_FILE)
        return chat.ChatTokenizer(tok, str(out / TOKENIZER_FILE)), TOKENIZER_FILE
    encoder = chat.ChatTokenizer.from_file(tokenizer)
    source = storage.path(tokenizer)
    if source.suffix != ".json":
        return encoder, str(source)
    chat.copy_tokenizer_json(source, out)  # a run reads it from here and keeps a copy
    return encoder, chat.TOKENIZER_JSON


def prepare_chat(
    input_paths: str | Sequence[str],
    output_dir: str,
    *,
    tokenizer: str = "",
    train_on: str = "assistant",
    vocab_size: int = 8192,
    num_shards: int = 1,
    tokenizer_train_mb: float = 100.0,
) -> dict:
    """Writes chat shards (ids and loss mask per conversation) and metadata.json; returns the metadata."""
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards} must be at least 1.")
    if train_on not in chat.TRAIN_ON:
        raise ValueError(f"--train_on={train_on!r} must be one of {', '.join(chat.TRAIN_ON)}.")
    files = sources.resolve_paths(input_paths, "--input")
    if not sum(1 for _ in chat.read_conversations(files)):  # checks every line before anything is written
        raise ValueError(f"--input={input_paths!r} holds no conversations; check the files.")
    out = storage.makedirs(output_dir)
    encoder, tok_path = _chat_tokenizer(files, tokenizer, out, vocab_size, tokenizer_train_mb)
    counts = {"num_documents": 0, "num_tokens": 0, "num_loss_tokens": 0}

    def records():
        for messages in chat.read_conversations(files):
            ids, mask = encoder.encode(messages, train_on=train_on)
            counts["num_documents"] += 1
            counts["num_tokens"] += len(ids)
            counts["num_loss_tokens"] += int(mask.sum())
            yield chat.encode_record(ids, mask)

    names = _write_shards(out, records(), num_shards)
    metadata = {
        **counts,
        "vocab_size": encoder.vocab_size,
        "tokenizer": tok_path,
        "bos_id": encoder.bos_id,
        "eos_id": encoder.eos_id,
        "pad_id": encoder.pad_id,
        "shards": names,
        "loss_mask": True,
        "train_on": train_on,
        "format": "chat: one record per conversation, huginn's template: its n token ids (int32 little-endian, "
                  "BOS first, end of text last), then n loss-mask bytes (1 = trained on)",
    }
    storage.write_text(out / sources.METADATA_FILE, json.dumps(metadata, indent=2))
    return metadata


FLAGS = flags.FlagValues()
_INPUT = flags.DEFINE_string("input", None, "Text/JSONL files: a glob or comma-separated globs.", flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for shards and metadata.json.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "SentencePiece .model (or, for chat, a tokenizer.json); '' trains one.", flag_values=FLAGS
)
_FORMAT = flags.DEFINE_enum("format", "text", FORMATS, "text: documents; chat: JSONL conversations.", flag_values=FLAGS)
_TRAIN_ON = flags.DEFINE_enum("train_on", "assistant", chat.TRAIN_ON,
                              "chat: the tokens in the loss, the assistant's or all.", flag_values=FLAGS)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary of a newly trained tokenizer.", flag_values=FLAGS)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "ArrayRecord shards to write.", flag_values=FLAGS)
_TRAIN_MB = flags.DEFINE_float("tokenizer_train_mb", 100.0, "MB of text to train a tokenizer on.", flag_values=FLAGS)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    del argv
    common = dict(tokenizer=_TOKENIZER.value, vocab_size=_VOCAB_SIZE.value, num_shards=_NUM_SHARDS.value,
                  tokenizer_train_mb=_TRAIN_MB.value)
    if _FORMAT.value == "chat":
        meta = prepare_chat(_INPUT.value, _OUTPUT_DIR.value, train_on=_TRAIN_ON.value, **common)
        print(f"Wrote {meta['num_documents']} conversations, {meta['num_tokens']} tokens "
              f"({meta['num_loss_tokens']} in the loss), vocab {meta['vocab_size']} to {_OUTPUT_DIR.value}")
        return
    meta = prepare(_INPUT.value, _OUTPUT_DIR.value, text_field=_TEXT_FIELD.value, **common)
    print(
        f"Wrote {meta['num_documents']} documents, {meta['num_tokens']} tokens, "
        f"vocab {meta['vocab_size']} to {_OUTPUT_DIR.value}"
    )


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"input": "docs/*.jsonl", "output_dir": "data/mine"})
