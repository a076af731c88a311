r"""Tokenizes text or JSONL files into ArrayRecord shards with a metadata.json.

    python -m rdlm.data.prepare --input='corpus/*.jsonl' --output_dir=/data/mine \
        [--tokenizer=model.spm] [--vocab_size=8192] [--num_shards=4]

A `.jsonl` file holds one document per line (the `--text_field` of each JSON object); any other
file is one document. Without `--tokenizer`, a SentencePiece model is trained on the input and
saved as `tokenizer.model` beside the shards. Then train with `data.source='arrayrecord'` and
`data.paths='/data/mine/*.array_record'`. Input and output may be local or gs:// (shards for gs:// are
written locally, then uploaded: the ArrayRecord writer only writes local files).
"""

import contextlib
import itertools
import json
from collections.abc import Iterator, Sequence

from absl import flags

from rdlm import cli, storage
from rdlm.data import sources
from rdlm.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"


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

    names = [f"data-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    num_docs = num_tokens = 0
    with contextlib.ExitStack() as stack:
        locals_ = [stack.enter_context(storage.local_file(out / name)) for name in names]
        writers = [stack.enter_context(sources.ShardWriter(path)) for path in locals_]
        for texts in _batched(read_documents(files, text_field), 256):
            for ids in tok.encode_batch(texts):
                if ids:
                    writers[num_docs % num_shards].write(ids)
                    num_docs, num_tokens = num_docs + 1, num_tokens + len(ids)
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


FLAGS = flags.FlagValues()
_INPUT = flags.DEFINE_string("input", None, "Text/JSONL files: a glob or comma-separated globs.", flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for shards and metadata.json.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "SentencePiece .model; '' trains one.", flag_values=FLAGS)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary of a newly trained tokenizer.", flag_values=FLAGS)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "ArrayRecord shards to write.", flag_values=FLAGS)
_TRAIN_MB = flags.DEFINE_float("tokenizer_train_mb", 100.0, "MB of text to train a tokenizer on.", flag_values=FLAGS)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> None:
    del argv
    meta = prepare(
        _INPUT.value,
        _OUTPUT_DIR.value,
        tokenizer=_TOKENIZER.value,
        vocab_size=_VOCAB_SIZE.value,
        num_shards=_NUM_SHARDS.value,
        text_field=_TEXT_FIELD.value,
        tokenizer_train_mb=_TRAIN_MB.value,
    )
    print(
        f"Wrote {meta['num_documents']} documents, {meta['num_tokens']} tokens, "
        f"vocab {meta['vocab_size']} to {_OUTPUT_DIR.value}"
    )


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"input": "docs/*.jsonl", "output_dir": "data/mine"})
