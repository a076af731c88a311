"""Bad input data, as a long run meets it: corrupt ArrayRecord and parquet shards (at the start or in the middle),
ids beyond the vocabulary, empty shards and text that is not UTF-8. Each is one sentence naming the file and the
record, or with data.on_bad_record='skip' is left out and counted, exactly, across resumes too."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fault_report
from rdlm.data import config as config_lib
from rdlm.data import pipeline, prepare, sources

BOS, EOS, PAD = 1, 2, 0
ROWS = 1  # one stream: a finite epoch is read to its end (several streams stop with the first to run out)


def _doc(d: int) -> list[int]:
    return [1000 * (d + 1) + j for j in range(4 + d % 5)]  # every token names its document: token // 1000 - 1


def _config(paths, **overrides):
    cfg = config_lib.get_config()
    cfg.update(dict(source="arrayrecord", paths=paths, seq_len=16, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                    eval_documents=0, num_epochs=1, read_threads=0), **overrides)
    return cfg


def _iterator(cfg):
    return pipeline.make_train_iterator(cfg, process_index=0, process_count=1, seed=0, batch_size_per_process=ROWS)


def _read_all(cfg) -> tuple[set[int], int]:
    """(documents seen, bad records counted) over one epoch."""
    seen, bad = set(), 0
    for batch in _iterator(cfg):
        seen |= {int(t) // 1000 - 1 for t in batch["targets"][batch["weights"] > 0] if t >= 1000}
        bad += int(batch[pipeline.BAD_RECORDS_KEY].sum())
    return seen, bad


def _shard(path, docs) -> str:
    with sources.ShardWriter(str(path)) as writer:
        for d in docs:
            writer.write(_doc(d))
    return str(path)


def _garble_one_record(path) -> int:
    """Flips 8 bytes of an ArrayRecord file where that breaks exactly one record (not the first); returns its index."""
    data = open(path, "rb").read()
    n = sources.ArrayRecordSource([path]).__len__()
    for offset in range(200, len(data) // 2, 61):
        garbled = data[:offset] + bytes(b ^ 0xFF for b in data[offset:offset + 8]) + data[offset + 8:]
        open(path, "wb").write(garbled)
        try:
            source = sources.ArrayRecordSource([path], on_bad_record="skip")
        except ValueError:
            continue
        bad = [i for i in range(n) if isinstance(source[i], sources.BadRecord)]
        if len(bad) == 1 and bad[0] > 0:
            return bad[0]
    raise AssertionError("no offset breaks exactly one record")


def test_a_shard_that_cannot_be_opened_is_named(tmp_path):
    good = _shard(tmp_path / "a.array_record", range(10))
    bad = _shard(tmp_path / "b.array_record", range(10, 20))
    open(bad, "r+b").truncate(40_000)
    with pytest.raises(ValueError) as error:
        _iterator(_config(str(tmp_path / "*.array_record")))
    assert str(error.value).startswith(f"The shard {bad} is not a readable ArrayRecord file (RuntimeError: ")
    assert str(error.value).endswith("; write it again or remove it from data.paths.") and good not in str(error.value)
    pq.write_table(pa.table({"input_ids": [_doc(d) for d in range(8)]}), tmp_path / "p.parquet")
    open(tmp_path / "p.parquet", "r+b").truncate(100)
    with pytest.raises(ValueError, match=rf"^The shard {tmp_path / 'p.parquet'} is not a readable parquet file "
                                         r"\(ArrowInvalid: .*\); write it again or remove it from data.paths.$"):
        _iterator(_config(str(tmp_path / "p.parquet"), source="parquet"))
    fault_report.record("shard unreadable at start (ArrayRecord, parquet)", 2, 2, "0 (stops before training, names the file)")


def test_a_corrupt_arrayrecord_record_mid_run_is_named_or_skipped_and_counted(tmp_path):
    path = _shard(tmp_path / "a.array_record", range(30))
    broken = _garble_one_record(path)
    with pytest.raises(ValueError) as error:
        _read_all(_config(path))
    assert str(error.value).startswith(f"{path} record {broken} cannot be read (RuntimeError: Corrupted Riegeli")
    assert str(error.value).endswith("; write the shard again, or set data.on_bad_record='skip' to leave such "
                                     "records out.")
    seen, bad = _read_all(_config(path, on_bad_record="skip"))
    assert bad == 1 and seen == set(range(30)) - {broken}
    fault_report.record("ArrayRecord record corrupt mid-run (data.on_bad_record='skip')", 1, 1,
                        "1 record: the corrupt one, counted")


def _parquet(tmp_path, docs, name="p.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.table({"input_ids": pa.array([_doc(d) for d in docs], pa.list_(pa.int32()))}), path,
                   row_group_size=10, write_page_checksum=True)
    return str(path)


def _garble_row_group(path, group: int) -> None:
    """Flips 16 bytes a quarter into a row group's column chunk (inside a checksummed page)."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    at = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size // 4
    data = open(path, "rb").read()
    open(path, "wb").write(data[:at] + bytes(b ^ 0xFF for b in data[at:at + 16]) + data[at + 16:])


def test_a_corrupt_parquet_row_group_mid_run_is_named_or_skipped_and_counted(tmp_path):
    path = _parquet(tmp_path, range(40))
    _garble_row_group(path, 2)
    with pytest.raises(ValueError, match=rf"^{path} row group 2 \(rows 20-29\) cannot be read \(OSError: .*\); write "
                                         "the file again, or set data.on_bad_record='skip'"):
        _read_all(_config(path, source="parquet"))
    seen, bad = _read_all(_config(path, source="parquet", on_bad_record="skip"))
    assert bad == 10 and seen == set(range(40)) - set(range(20, 30))
    fault_report.record("parquet row group corrupt mid-run (data.on_bad_record='skip')", 1, 1,
                        "10 records: the corrupt group's, counted")


def test_ids_beyond_the_vocabulary_are_skipped_and_counted(tmp_path):
    docs = [[3 + (d + j) % 400 for j in range(6)] for d in range(24)]
    docs[5][2], docs[17][0] = 512, 900
    for kind in ("arrayrecord", "parquet"):
        path = tmp_path / f"ids.{kind}"
        if kind == "parquet":
            pq.write_table(pa.table({"input_ids": docs}), path, row_group_size=8)
        else:
            with sources.ShardWriter(str(path)) as writer:
                for doc in docs:
                    writer.write(doc)
        cfg = _config(str(path), source=kind, on_bad_record="skip")
        source = pipeline._file_source(cfg, cfg.paths, "data.paths", 512)
        bad = {i: source[i] for i in range(len(source)) if isinstance(source[i], sources.BadRecord)}
        assert sorted(bad) == [5, 17]
        unit = "row" if kind == "parquet" else "record"
        assert bad[5].describe().startswith(f"{path} {unit} 5")
        assert bad[5].describe().endswith("holds token id 512, outside [0, model.vocab_size=512)")
    fault_report.record("ids >= model.vocab_size (data.on_bad_record='skip')", 2, 2, "2 records: the bad ones, counted")


def test_empty_shards_are_named_or_passed_over(tmp_path):
    _shard(tmp_path / "a.array_record", range(12))
    empty = _shard(tmp_path / "b.array_record", [])
    with pytest.raises(ValueError, match=rf"^The shard {empty} holds no records; remove it from data.paths or write "
                                         "it again, or set data.on_bad_record='skip'"):
        _iterator(_config(str(tmp_path / "*.array_record")))
    seen, bad = _read_all(_config(str(tmp_path / "*.array_record"), on_bad_record="skip"))
    assert seen == set(range(12)) and bad == 0
    _parquet(tmp_path, range(12), "a.parquet")
    empty = _parquet(tmp_path, [], "b.parquet")
    with pytest.raises(ValueError, match=rf"^The shard {empty} holds no records"):
        _iterator(_config(str(tmp_path / "*.parquet"), source="parquet"))
    assert _read_all(_config(str(tmp_path / "*.parquet"), source="parquet", on_bad_record="skip"))[0] == set(range(12))
    fault_report.record("empty shard", 2, 2, "0 records")


def test_skipped_records_are_counted_once_across_resumes(tmp_path):
    path = _parquet(tmp_path, range(60))
    _garble_row_group(path, 3)
    cfg = _config(path, source="parquet", on_bad_record="skip", num_epochs=2)
    straight = [(b["inputs"].copy(), int(b[pipeline.BAD_RECORDS_KEY].sum())) for b in _iterator(cfg)]
    assert sum(n for _, n in straight) == 20  # ten rows per epoch
    for saved in range(1, len(straight) - 1, 3):
        it = _iterator(cfg)
        for _ in range(saved):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        resumed = _iterator(cfg)
        resumed.set_state(state)
        rest = [(b["inputs"], int(b[pipeline.BAD_RECORDS_KEY].sum())) for b in resumed]
        assert [n for _, n in rest] == [n for _, n in straight[saved:]]
        assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(rest, straight[saved:]))


def test_text_that_is_not_utf8_is_named_with_its_file_and_line(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text\n" * 50)
    (tmp_path / "latin.txt").write_bytes(b"first line\nsecond caf\xe9 line\n")
    with pytest.raises(ValueError) as error:
        prepare.prepare(str(tmp_path / "*.txt"), str(tmp_path / "out"), vocab_size=300)
    assert str(error.value) == (
        f"{tmp_path / 'latin.txt'} is not UTF-8 text: byte 0xe9 at line 2 (invalid continuation byte); convert the "
        "file to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of --input.")
    (tmp_path / "docs.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'docs.jsonl'} is not UTF-8 text: byte 0xe9 at line 3 "):
        prepare.prepare(str(tmp_path / "docs.jsonl"), str(tmp_path / "out2"), vocab_size=300)
    fault_report.record("text not UTF-8 given to rdlm.data.prepare", 2, 2, "0 (one sentence: file, line, byte)")
