"""One storage layer for every user path: local paths as plain files, gs:// against a real GCS server on
127.0.0.1 (fake-gcs-server, tests/gcs_emulator.py), one sentence for each failure, and no file access
around it anywhere in rdlm/."""

import glob as stdlib_glob
import http.server
import json
import os
import pathlib
import pickle
import re
import threading

import grain
import jax
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import train_config
from rdlm import checkpoint_io, storage
from rdlm.data import pipeline, prepare, sources
from rdlm.data import config as config_lib
from rdlm.interop import huginn
from rdlm.train import train_and_evaluate

RDLM = pathlib.Path(__file__).resolve().parents[1] / "rdlm"


def test_local_globs_match_glob_glob(tmp_path, monkeypatch):
    for name in ("a.parquet", "b.parquet", ".hidden.parquet", "sub/c.parquet", "sub/deep/d.parquet",
                 ".dot/e.parquet", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / "dir.parquet").mkdir()
    for pattern in ("*.parquet", "**/*.parquet", "*/*.parquet", "sub/**", "[ab].parquet", "a.parquet", "none*",
                    ".*.parquet", "missing.parquet"):
        expected = sorted(p for p in stdlib_glob.glob(str(tmp_path / pattern), recursive=True) if os.path.isfile(p))
        assert storage.glob(str(tmp_path / pattern)) == expected, pattern
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.glob("~/*.parquet") == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    monkeypatch.chdir(tmp_path / "sub")
    assert storage.glob("*.parquet") == [str(tmp_path / "sub" / "c.parquet")]


def test_gcs_files_round_trip(gcs_server, gcs_bucket, tmp_path):
    storage.write_text(f"{gcs_bucket}/d/a.txt", "é\n")
    storage.write_bytes(f"{gcs_bucket}/d/sub/b.bin", b"\0\1")
    storage.write_text(f"{gcs_bucket}/d/.hidden.txt", "x")
    assert storage.read_text(f"{gcs_bucket}/d/a.txt") == "é\n" and storage.is_file(f"{gcs_bucket}/d/a.txt")
    assert storage.glob(f"{gcs_bucket}/d/*.txt") == [f"{gcs_bucket}/d/a.txt"]
    assert storage.glob(f"{gcs_bucket}/d/**") == [f"{gcs_bucket}/d/a.txt", f"{gcs_bucket}/d/sub/b.bin"]
    assert storage.glob(f"{gcs_bucket}/e/*.txt") == [] and not storage.exists(f"{gcs_bucket}/e")
    with storage.open(f"{gcs_bucket}/d/sub/b.bin", "rb") as f:
        f.seek(1)
        assert f.read() == b"\1"
    storage.copy(f"{gcs_bucket}/d/a.txt", tmp_path / "a.txt")
    storage.copy(tmp_path / "a.txt", f"{gcs_bucket}/copied.txt")
    assert storage.read_bytes(f"{gcs_bucket}/copied.txt") == "é\n".encode()
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_write(f"{gcs_bucket}/never.bin") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_write(tmp_path / "never.bin") as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert sorted(gcs_server.object_names(gcs_bucket)) == ["copied.txt", "d/.hidden.txt", "d/a.txt", "d/sub/b.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert storage.makedirs(f"{gcs_bucket}/run") == storage.path(f"{gcs_bucket}/run")


def test_missing_bucket_and_empty_glob_are_one_sentence(gcs_server, gcs_bucket, tmp_path):
    missing = "gs://no-such-bucket-rdlm/run"
    bucket_error = "the bucket 'no-such-bucket-rdlm' does not exist"
    for call in (lambda: storage.makedirs(missing), lambda: storage.read_text(missing + "/a.json"),
                 lambda: sources.resolve_paths(missing + "/*.parquet")):
        with pytest.raises(FileNotFoundError) as error:
            call()
        assert missing in str(error.value) and bucket_error in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError) as error:
        checkpoint_io.load_params(missing)
    assert str(error.value) == f"Checkpoint path {missing} does not exist (the bucket 'no-such-bucket-rdlm' does not exist)."
    with pytest.raises(FileNotFoundError) as error:
        sources.resolve_paths(f"{gcs_bucket}/data/*.parquet")
    assert str(error.value) == f"data.paths: '{gcs_bucket}/data/*.parquet' matches no file; check the path or glob."
    with pytest.raises(FileNotFoundError) as error:  # before anything is built or compiled
        train_and_evaluate(train_config.small_config(tmp_path), missing)
    assert str(error.value) == f"{missing}: the bucket 'no-such-bucket-rdlm' does not exist; create it or fix the name."


class _RefusingGCS(http.server.BaseHTTPRequestHandler):
    """Answers every request as GCS answers an anonymous caller on a private bucket (fake-gcs-server checks no
    credentials, so it cannot show this case)."""

    def _refuse(self):
        body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have storage.objects.list "
                                     "access to the Google Cloud Storage bucket."}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _refuse

    def log_message(self, *args):
        pass


def test_no_credentials_is_one_sentence_naming_what_to_set(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingGCS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
        for call in (lambda: sources.resolve_paths("gs://private-bucket/data/*.parquet"),
                     lambda: checkpoint_io.load_params("gs://private-bucket/run"),
                     lambda: storage.makedirs("gs://private-bucket/run")):
            with pytest.raises(PermissionError) as error:
                call()
            message = str(error.value)
            assert message.startswith("Access to gs://private-bucket/") and "no Google credentials were found" in message
            assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "gcloud auth application-default login" in message
    finally:
        server.shutdown()


def _parquet(path, rows, **options):
    with storage.atomic_write(path) as f:
        pq.write_table(pa.table({"input_ids": rows}), f, **options)


def test_parquet_from_gcs_reads_and_pickles_like_local(gcs_bucket, tmp_path):
    rows = [list(range(k, 3 * k)) for k in range(1, 12)]
    for root in (gcs_bucket, str(tmp_path)):
        _parquet(f"{root}/a.parquet", rows, row_group_size=4)
        _parquet(f"{root}/b.parquet", rows[:3])
    remote = sources.ParquetSource(sources.resolve_paths(f"{gcs_bucket}/*.parquet"))
    local = sources.ParquetSource(sources.resolve_paths(str(tmp_path / "*.parquet")))
    remote = pickle.loads(pickle.dumps(remote))  # what grain worker processes receive
    assert len(remote) == len(local) == 14
    for i in (13, 0, 7, 4, 11, 2):
        np.testing.assert_array_equal(remote[i], local[i])
        np.testing.assert_array_equal(remote[i], (rows + rows[:3])[i])


def test_prepare_and_arrayrecord_from_gcs(gcs_server, gcs_bucket, tmp_path):
    texts = ["def f(x):\n    return x + 1\n" * 20, "é plain text", "another document"]
    storage.write_text(f"{gcs_bucket}/in/a.txt", texts[0])
    storage.write_text(f"{gcs_bucket}/in/b.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts[1:]))
    meta = prepare.prepare(f"{gcs_bucket}/in/*", f"{gcs_bucket}/out", vocab_size=300, num_shards=2)
    assert meta["num_documents"] == 3
    assert sorted(n for n in gcs_server.object_names(gcs_bucket) if n.startswith("out/")) == [
        "out/data-00000-of-00002.array_record", "out/data-00001-of-00002.array_record", "out/metadata.json",
        "out/tokenizer.model"]
    cfg = config_lib.get_config()
    cfg.source, cfg.paths = "arrayrecord", f"{gcs_bucket}/out/*.array_record"
    tok = pipeline.load_tokenizer(cfg)  # found through the metadata.json beside the shards, on gs://
    source = sources.ArrayRecordSource(sources.resolve_paths(cfg.paths))  # array_record's own GCS client
    source = pickle.loads(pickle.dumps(source))
    assert sorted(tok.decode(source[i]) for i in range(len(source))) == sorted(texts)
    batches = grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=2))
    assert sum(len(doc) for doc in batches) == meta["num_tokens"]


def test_hf_checkpoint_from_and_to_gcs(gcs_bucket, huginn_tiny_dir):
    for path in (huginn_tiny_dir / "checkpoint").iterdir():
        storage.copy(path, f"{gcs_bucket}/hf/{path.name}")
    config, params = huginn.load_hf_checkpoint(f"{gcs_bucket}/hf")  # byte ranges, tensor by tensor
    expected_config, expected = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")  # memory-mapped
    assert config == expected_config
    huginn.save_hf_checkpoint(config, params, f"{gcs_bucket}/back", dtype="bfloat16")
    _, back = huginn.load_hf_checkpoint(f"{gcs_bucket}/back", dtype="float32")
    for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(expected), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b.astype(ml_dtypes.bfloat16).astype(np.float32))


# Patterns that touch files without the storage layer, and the only places that may keep one (with why).
FORBIDDEN = {
    "os.path": r"\bos\.path\b",
    "glob": r"^\s*(import glob|from glob import)|\bglob\.glob\(",
    "open(": r"(?<![\w.])open\(",
    "pathlib": r"\bpathlib\b",
    "os file calls": r"\bos\.(makedirs|mkdir|replace|rename|remove|unlink|walk|listdir|scandir|stat)\(",
    "shutil": r"\bshutil\b",
    "numpy files": r"\bnp\.(load|save|fromfile|memmap)\(|\.tofile\(",
}
ALLOWED = {
    ("rdlm/storage.py", "open("): "the storage layer's own `def open(`, which every other module calls",
    ("rdlm/storage.py", "glob"): "the storage layer's local globs are glob.glob's, so local paths match as before",
    ("rdlm/interop/safetensors_io.py", "numpy files"): "np.memmap of the local path storage.local_path returned",
}


def test_no_file_access_outside_the_storage_layer():
    found = set()
    offences = []
    for file in sorted(RDLM.rglob("*.py")):
        name = file.relative_to(RDLM.parent).as_posix()
        for number, line in enumerate(file.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for kind, pattern in FORBIDDEN.items():
                if re.search(pattern, code):
                    if (name, kind) in ALLOWED:
                        found.add((name, kind))
                    else:
                        offences.append(f"{name}:{number}: {kind}: {line.strip()}")
    assert offences == [], "use rdlm.storage for these paths:\n" + "\n".join(offences)
    assert found == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - found}"


def test_parquet_from_gcs_reads_safely_from_many_threads(gcs_bucket):
    """grain reads a source from several threads at once; a pyarrow reader shared between them crashed."""
    rows = [[k] * (1 + k % 13) for k in range(2000)]
    _parquet(f"{gcs_bucket}/many.parquet", rows, row_group_size=5)  # 400 row groups
    source = sources.ParquetSource([f"{gcs_bucket}/many.parquet"])
    source._CACHED_ROW_GROUPS = 1  # every read goes to the file
    order = list(grain.MapDataset.range(len(rows)).shuffle(seed=0))
    ds = grain.MapDataset.source(source).shuffle(seed=0).to_iter_dataset(grain.ReadOptions(num_threads=8))
    assert [doc.tolist() for doc in ds] == [rows[i] for i in order]
