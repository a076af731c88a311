"""Tests of rdlm.data: packing, sources, prepare, the pipeline, the built-in mix, bad input."""

import dataclasses
import json
import pickle
import random
import sys
import types

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdlm.data import builtin, packing, pipeline, prepare, sources
from rdlm.data import config as config_lib
from rdlm.data import tokenizer as tokenizer_lib

BOS, EOS, PAD = 1, 2, 0


def _doc(k: int, n: int) -> np.ndarray:
    """Document k: n token ids unique across documents (k * 1000 + i), so leaks are visible."""
    return np.arange(k * 1000, k * 1000 + n, dtype=np.int32)


def _check_rows(rows, seq_len):
    """Checks the per-row invariants and returns the weighted (input, target) pairs."""
    pairs = []
    for r in rows:
        assert {k: v.shape for k, v in r.items()} == {k: (seq_len,) for k in r}
        np.testing.assert_array_equal(r["inputs"][1:], r["targets"][:-1])
        seg, pos, w = r["segment_ids"], r["positions"], r["weights"]
        for t in range(seq_len):
            if seg[t] == 0:
                assert w[t] == 0 and pos[t] == 0 and r["inputs"][t] == PAD
            elif t == 0 or seg[t] != seg[t - 1]:
                assert pos[t] == 0 and seg[t] == (seg[t - 1] + 1 if t else 1)
            else:
                assert pos[t] == pos[t - 1] + 1
            if w[t]:
                assert t + 1 == seq_len or seg[t + 1] == seg[t]
                pairs.append((int(r["inputs"][t]), int(r["targets"][t])))
    return pairs


def _all_pairs(docs, eos=None):
    pairs = []
    for d in docs:
        ids = [BOS] + list(d) + ([eos] if eos is not None else [])
        pairs += list(zip(ids[:-1], ids[1:]))
    return pairs


def test_packing_by_hand():
    seq_len = 8
    # A short one, one exactly a row long (BOS + 8 ids = 9 slots), one of 2.5 rows, a short one.
    docs = [_doc(1, 3), _doc(2, seq_len), _doc(3, 20), _doc(4, 2)]
    rows = packing.pack_documents(docs, seq_len=seq_len, bos_id=BOS)
    # Every next-token pair of every document is trained exactly once; nothing else is.
    assert sorted(_check_rows(rows, seq_len)) == sorted(_all_pairs(docs))
    first = rows[0]
    np.testing.assert_array_equal(first["inputs"], [BOS, 1000, 1001, 1002, BOS, 2000, 2001, 2002])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 0, 1, 2, 3])
    # Doc 1 never predicts doc 2's BOS.
    np.testing.assert_array_equal(first["weights"], [1, 1, 1, 0, 1, 1, 1, 1])
    # The continuation of doc 2 starts without BOS, with the overlapping token, at position 0.
    assert rows[1]["inputs"][0] == 2003 and rows[1]["positions"][0] == 0
    # A document exactly a row long fills a fresh row exactly.
    row = packing.pack_documents([_doc(2, seq_len)], seq_len=seq_len, bos_id=BOS)
    assert len(row) == 1 and row[0]["weights"].all() and (row[0]["segment_ids"] == 1).all()
    # The last row is padded; padding has weight 0.
    assert rows[-1]["segment_ids"][-1] == 0


def test_packing_eos_loss_mask_and_existing_bos():
    seq_len = 6
    # A prompt/answer document, a long one, one that already starts with BOS, a one-token one.
    docs = [{"ids": _doc(1, 4), "loss_mask": np.array([0, 0, 1, 1])}, _doc(2, 9),
            np.concatenate([[BOS], _doc(3, 2)]), _doc(4, 1)]
    rows = packing.pack_documents(docs, seq_len=seq_len, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    pairs = _check_rows(rows, seq_len)
    masked = {(BOS, 1000), (1000, 1001)}  # Targets 1000 and 1001 are out of the loss.
    plain = [docs[0]["ids"], docs[1], docs[2][1:], docs[3]]
    assert sorted(pairs) == sorted(set(_all_pairs(plain, EOS)) - masked)
    assert (EOS, BOS) not in pairs
    # The existing BOS is kept, not doubled.
    tokens = np.concatenate([r["inputs"] for r in rows])
    assert not np.any((tokens[:-1] == BOS) & (tokens[1:] == BOS))


def test_packing_state_resumes_every_row():
    docs = [_doc(k, n) for k, n in enumerate([3, 17, 1, 0, 40, 5, 9, 2], 1)]
    ds = packing.PackIterDataset(
        grain.MapDataset.source(docs).to_iter_dataset(), seq_len=5, bos_id=BOS)
    full = list(ds)
    it = iter(ds)
    for i in range(len(full)):
        state = json.loads(json.dumps(it.get_state()))
        fresh = iter(ds)
        fresh.set_state(state)
        for want in full[i:]:
            got = next(fresh)
            assert all(np.array_equal(got[k], want[k]) for k in want)
        next(it)


@pytest.fixture
def shards(tmp_path):
    """40 documents of random length in two native shards; returns (glob, docs)."""
    rng = random.Random(0)
    docs = [_doc(k, rng.randint(1, 30)) for k in range(1, 41)]
    for i in range(2):
        with sources.ShardWriter(str(tmp_path / f"d-{i}.array_record")) as w:
            for d in docs[i::2]:
                w.write(d)
    return str(tmp_path / "*.array_record"), docs


def _file_config(paths, **overrides):
    cfg = config_lib.get_config()
    cfg.update(dict(source="arrayrecord", paths=paths, seq_len=16, bos_id=BOS, eos_id=EOS,
                    pad_id=PAD, eval_documents=4), **overrides)
    return cfg


def test_train_iterator_resumes_exactly(shards):
    cfg = _file_config(shards[0], seq_len=64)
    kwargs = dict(process_index=0, process_count=1, seed=3, batch_size_per_process=2)
    it = pipeline.make_train_iterator(cfg, **kwargs)
    batches, states = [], []
    for _ in range(7):  # 7 * 2 rows of 65 slots is more than one epoch of the 36 documents.
        batches.append(next(it))
        states.append(json.loads(json.dumps(it.get_state())))  # As a checkpoint stores it.
    assert batches[0]["inputs"].shape == (2, 64) and batches[0]["weights"].dtype == np.float32
    assert any('"offset": -1' not in json.dumps(s) for s in states)  # Some save is mid-document.
    for saved in range(1, 7):  # The brief's case is saved == 3.
        resumed = pipeline.make_train_iterator(cfg, **kwargs)
        resumed.set_state(states[saved - 1])
        for want in batches[saved:]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])


def _documents_seen(batches) -> set[int]:
    return {int(t) // 1000 for b in batches for t in b["inputs"][b["weights"] > 0] if t >= 1000}


def test_host_slices_are_disjoint_and_complete(shards):
    cfg = _file_config(shards[0], num_epochs=1)
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, process_index=p, process_count=2, seed=1,
                                          batch_size_per_process=1)
        seen.append(_documents_seen(list(it)))
    source = sources.ArrayRecordSource(sources.resolve_paths(shards[0]))
    held = {int(source[i][0]) // 1000 for i in range(4)}  # data.eval_documents=4 come first.
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(1, 41)) - held
    evals = pipeline.make_eval_batches(cfg, batch_size=2, num_batches=5)  # Real ones: <= 4.
    assert len(evals) == 5 and _documents_seen(evals) == held
    assert all(b["inputs"].shape == (2, 16) for b in evals) and not evals[-1]["weights"].any()
    again = pipeline.make_eval_batches(cfg, batch_size=2, num_batches=5)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(evals, again) for k in a)


def test_prepare_round_trips(tmp_path):
    texts = ["def f(x):\n    return x  + 12345\n", "\tüñí€ode 🙂\n\n  spaces  ", "plain"]
    (tmp_path / "a.txt").write_text(texts[0] * 40)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[1:]))
    out = tmp_path / "out"
    meta = prepare.prepare(str(tmp_path / "*.*"), str(out), vocab_size=320, num_shards=2)
    assert meta["num_documents"] == 3 and meta["bos_id"] == BOS and meta["pad_id"] == PAD
    assert (out / "tokenizer.model").is_file()
    assert json.loads((out / "metadata.json").read_text())["num_tokens"] == meta["num_tokens"]
    cfg = _file_config(str(out / "*.array_record"), bos_id=-1, eos_id=-1, pad_id=-1)
    tok = pipeline.load_tokenizer(cfg)
    assert pipeline.special_ids(cfg) == pipeline.SpecialIds(BOS, EOS, PAD)
    assert pipeline.corpus_vocab_size(cfg) == 320 == tok.vocab_size
    source = sources.ArrayRecordSource(sources.resolve_paths(cfg.paths))
    tok = pickle.loads(pickle.dumps(tok))  # It travels to grain workers this way.
    decoded = sorted(tok.decode(source[i]) for i in range(len(source)))
    assert decoded == sorted([texts[0] * 40] + texts[1:])


def test_parquet_source_reads_ids(tmp_path):
    rows = [list(_doc(k, k)) for k in range(1, 8)]
    table = pa.table({"input_ids": rows, "meta": [str(k) for k in range(7)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(0, 2), tmp_path / "b.parquet")
    source = sources.ParquetSource(sources.resolve_paths(str(tmp_path / "*.parquet")))
    source = pickle.loads(pickle.dumps(source))
    assert len(source) == 9
    for i in [8, 0, 5, 3, 7, 1]:
        np.testing.assert_array_equal(source[i], (rows + rows[:2])[i])
    cfg = _file_config(str(tmp_path / "*.parquet"), source="parquet", eval_documents=1)
    assert len(pipeline.documents(cfg, "train")) == 8


def _stand_in_tasks():
    """A small module with the interface of rdlm.data.tasks: reverse a digit string."""

    @dataclasses.dataclass(frozen=True)
    class Problem:
        prompt: str
        answer: str
        difficulty: int

    def generate(task, num, *, seed, difficulties):
        rng = random.Random(f"{task}:{seed}")
        out = []
        for _ in range(num):
            d = rng.choice(list(difficulties))
            digits = "".join(rng.choice("0123456789") for _ in range(4 * d))
            out.append(Problem(f"reverse {digits}=", digits[::-1], d))
        return out

    return types.SimpleNamespace(TASKS=("reverse",), Problem=Problem, generate=generate)


def _builtin_config(tmp_path, **overrides):
    cfg = config_lib.get_config()
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.seq_len = 64
    cfg.builtin.update(dict(vocab_size=400, code_max_mb=0.3, tokenizer_train_mb=0.2,
                            difficulties=(1, 2), heldout_problems=16), **overrides)
    return cfg


def test_builtin_mix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdlm.data.tasks", _stand_in_tasks())
    cfg = _builtin_config(tmp_path)
    builtin.build.cache_clear()
    corpus = pipeline.builtin_corpus(cfg)
    tok = corpus.tokenizer
    code = [d for d in corpus.train_docs if not isinstance(d, dict)]
    tasks = [d for d in corpus.train_docs if isinstance(d, dict)]
    assert any("def " in tok.decode(d) for d in code[:20])
    first = tok.decode(tasks[0]["ids"])
    assert first.startswith("reverse ") and first.split("=")[0][8:][::-1] == first.split("=")[1]
    assert not tasks[0]["loss_mask"][0] and tasks[0]["loss_mask"][-1]
    share = corpus.task_tokens / (corpus.task_tokens + corpus.code_tokens)
    assert abs(share - 0.2) < 0.01
    heldout = builtin.heldout_problems(cfg)["reverse"]
    assert {tok.decode(d["ids"]) for d in tasks}.isdisjoint({p.prompt + p.answer for p in heldout})
    # Deterministic, and the second build loads the cached tokenizer.
    assert len(list((tmp_path / "cache").glob("builtin-*.model"))) == 1
    builtin.build.cache_clear()

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer should come from the cache")

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", no_training)
    again = pipeline.builtin_corpus(cfg)
    assert again.tokenizer.model_proto == tok.model_proto
    assert all(np.array_equal(a["ids"] if isinstance(a, dict) else a,
                              b["ids"] if isinstance(b, dict) else b)
               for a, b in zip(again.train_docs, corpus.train_docs))
    batch = next(pipeline.make_train_iterator(cfg, process_index=0, process_count=1, seed=0,
                                              batch_size_per_process=4))
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].max() < tok.vocab_size
    assert len(pipeline.make_eval_batches(cfg, batch_size=4)) == cfg.eval_batches
    builtin.build.cache_clear()


def test_builtin_with_real_tasks(tmp_path):
    tasks = pytest.importorskip("rdlm.data.tasks")
    cfg = _builtin_config(tmp_path, code_max_mb=0.1)
    builtin.build.cache_clear()
    corpus = pipeline.builtin_corpus(cfg)
    assert sum(isinstance(d, dict) for d in corpus.train_docs) > 0
    assert set(builtin.heldout_problems(cfg)) == set(tasks.TASKS)
    builtin.build.cache_clear()


def _message(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_bad_input_messages(tmp_path):
    kwargs = dict(process_index=0, process_count=1, seed=0, batch_size_per_process=1)
    make = pipeline.make_train_iterator
    missing = str(tmp_path / "nope" / "x.array_record")
    msg = _message(FileNotFoundError, make, _file_config(missing), **kwargs)
    assert "data.paths" in msg and missing in msg and "matches no file" in msg
    msg = _message(FileNotFoundError, make, _file_config(str(tmp_path / "*.parquet")), **kwargs)
    assert "*.parquet" in msg and "matches no file" in msg

    with sources.ShardWriter(str(tmp_path / "empty.array_record")):
        pass
    msg = _message(ValueError, make, _file_config(str(tmp_path / "empty.array_record")), **kwargs)
    assert "holds no documents" in msg and "empty.array_record" in msg
    with sources.ShardWriter(str(tmp_path / "zero.array_record")) as w:
        for _ in range(3):
            w.write([])
    msg = _message(ValueError, make, _file_config(str(tmp_path / "zero.array_record")), **kwargs)
    assert "zero tokens" in msg
    (tmp_path / "blank.txt").write_text("")
    msg = _message(ValueError, prepare.prepare, str(tmp_path / "blank.txt"), str(tmp_path / "o"))
    assert "holds no text" in msg

    msg = _message(ValueError, tokenizer_lib.check_vocab, 5000, 4096)
    assert "5000" in msg and "model.vocab_size is 4096" in msg
    tokenizer_lib.check_vocab(4096, 4096)

    pq.write_table(pa.table({"tokens": [[1, 2]], "text": ["a"]}), tmp_path / "p.parquet")
    cfg = _file_config(str(tmp_path / "p.parquet"), source="parquet")
    msg = _message(ValueError, make, cfg, **kwargs)
    assert "no column 'input_ids'" in msg and "['tokens', 'text']" in msg
    assert "data.parquet_column" in msg

    cfg = _file_config(str(tmp_path / "p.parquet"), source="parquet", bos_id=-1)
    msg = _message(ValueError, pipeline.special_ids, cfg)
    assert "No BOS id is known" in msg and "data.bos_id" in msg

    msg = _message(ValueError, make, _file_config("x", source="csv"), **kwargs)
    assert "data.source='csv'" in msg
    msg = _message(FileNotFoundError, tokenizer_lib.Tokenizer.from_file, tmp_path / "t.model")
    assert "t.model" in msg
