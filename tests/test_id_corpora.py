"""Corpora of bare token ids (huginn-dataset's form): parquet `input_ids` with no tokenizer or metadata beside it.
They train with only data.bos_id/eos_id/pad_id given, and an id outside the model's vocabulary is one sentence
naming the file, the record and the id: at start from parquet statistics, otherwise when the record is read."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train_config
from rdlm import metrics
from rdlm.data import pipeline, sources
from rdlm.train import train_and_evaluate

VOCAB = 512  # train_config's model.vocab_size


def id_documents(n: int = 64, seed: int = 0) -> list[list[int]]:
    """`n` documents of 10-60 random ids in [3, VOCAB) (0, 1, 2 are pad, BOS, EOS)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(10, 60))).tolist() for _ in range(n)]


def id_corpus_config(cache_dir, paths, **overrides):
    return train_config.small_config(cache_dir, **{
        "data.source": "parquet", "data.paths": paths, "data.bos_id": 1, "data.eos_id": 2, "data.pad_id": 0,
        "data.eval_documents": 8, "eval.final_num_steps": (), **overrides})


def test_a_bare_id_corpus_trains_with_only_its_special_ids(tmp_path):
    pq.write_table(pa.table({"input_ids": id_documents()}), tmp_path / "ids.parquet", row_group_size=16)
    config = id_corpus_config(tmp_path / "cache", str(tmp_path / "*.parquet"), **{"train.num_steps": 2})
    train_and_evaluate(config, str(tmp_path / "run"))
    losses = [row["loss"] for row in metrics.read_metrics(tmp_path / "run") if "loss" in row]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] == pytest.approx(np.log(VOCAB), rel=0.05)
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def _iterator(config):
    return pipeline.make_train_iterator(config, process_index=0, process_count=1, seed=0, batch_size_per_process=8)


def test_an_id_beyond_the_vocabulary_is_named_with_its_file_record_and_value(tmp_path):
    docs = id_documents()
    docs[21][4] = 600
    pq.write_table(pa.table({"input_ids": docs}), tmp_path / "stats.parquet", row_group_size=16)
    with pytest.raises(ValueError) as error:  # at start: the row group's statistics say so
        _iterator(id_corpus_config(tmp_path, str(tmp_path / "stats.parquet")))
    assert str(error.value) == (
        f"{tmp_path / 'stats.parquet'} row group 1 (column 'input_ids', by its statistics) holds token id 600, "
        "outside [0, model.vocab_size=512); raise model.vocab_size above the corpus's largest id, or fix the corpus.")

    pq.write_table(pa.table({"input_ids": docs}), tmp_path / "plain.parquet", row_group_size=16,
                   write_statistics=False)
    it = _iterator(id_corpus_config(tmp_path, str(tmp_path / "plain.parquet"), **{"data.eval_documents": 0}))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'plain.parquet'} row 21 .column 'input_ids'. holds token "
                                         r"id 600, outside \[0, model.vocab_size=512\)"):
        for _ in range(16):  # every document is read within 8 batches of 8 rows
            next(it)

    with sources.ShardWriter(str(tmp_path / "ids.array_record")) as writer:
        for doc in docs:
            writer.write(doc)
    config = id_corpus_config(tmp_path, str(tmp_path / "ids.array_record"), **{"data.source": "arrayrecord",
                                                                               "data.eval_documents": 0})
    it = _iterator(config)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'ids.array_record'} record 21 holds token id 600"):
        for _ in range(16):
            next(it)


def test_a_special_id_beyond_the_vocabulary_is_one_sentence(tmp_path):
    pq.write_table(pa.table({"input_ids": id_documents()}), tmp_path / "ids.parquet")
    with pytest.raises(ValueError) as error:
        _iterator(id_corpus_config(tmp_path, str(tmp_path / "ids.parquet"), **{"data.eos_id": 512}))
    assert str(error.value) == ("The EOS id 512 (data.eos_id or the tokenizer's) is outside [0, "
                                "model.vocab_size=512); set data.eos_id below model.vocab_size.")
