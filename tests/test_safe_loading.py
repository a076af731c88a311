"""Loading a checkpoint runs nothing from it: no pickle is ever unpickled, `auto_map` and any .py beside the weights
are ignored, and a safetensors file with a bad header is one sentence naming it, not a struct.error."""

import json
import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys

import pytest

import fault_report
from rdlm.interop import huginn, safetensors_io

REPO = pathlib.Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickling this writes a marker file: what a malicious pytorch_model.bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def _planted_copy(huginn_tiny_dir, tmp_path) -> pathlib.Path:
    """The tiny HF checkpoint with auto_map's modules, a pickled weights file and a stray .py beside it."""
    folder = tmp_path / "hf"
    shutil.copytree(huginn_tiny_dir / "checkpoint", folder)
    config = json.loads((folder / "config.json").read_text())
    modules = {value.split(".")[0] for value in config["auto_map"].values()}
    for name in modules | {"modeling_evil"}:
        (folder / f"{name}.py").write_text(f"open({str(tmp_path / ('imported-' + name))!r}, 'w').write('x')\n")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(tmp_path / "unpickled")))
    return folder


AUDIT = """
import json, sys
events = []
def audit(event, args):
    if event.startswith("pickle.") or (event == "import" and args[0].split(".")[0] in MODULES):
        events.append([event, str(args[0])])
sys.addaudithook(audit)
from rdlm import checkpoint_io
from rdlm.interop import convert
config, params = checkpoint_io.load_params(SOURCE)
convert.convert("to-orbax", SOURCE, TARGET)
checkpoint_io.load_params(TARGET)
print(json.dumps(events))
"""


@pytest.mark.slow  # a fresh interpreter with an audit hook (~10 s on 2 busy cores)
def test_loading_unpickles_nothing_and_runs_no_code_from_the_checkpoint(huginn_tiny_dir, tmp_path):
    folder = _planted_copy(huginn_tiny_dir, tmp_path)
    modules = sorted(p.stem for p in folder.glob("*.py"))
    script = (f"MODULES = {modules!r}\nSOURCE = {str(folder)!r}\nTARGET = {str(tmp_path / 'orbax')!r}\n" + AUDIT)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # no pickle.find_class, no import of a planted file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "orbax"]  # no marker was written
    fault_report.record("pickle, auto_map and .py files beside the weights", 1, 1, "0 (nothing run)")


def test_rdlm_has_no_pickle_loader():
    """The audit above covers the paths it runs; this covers the rest of the code."""
    loader = re.compile(r"pickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|\bnp\.load\(|dill\.|joblib\.load")
    offences = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "rdlm").rglob("*.py"))
                for i, line in enumerate(p.read_text().splitlines(), 1) if loader.search(line.split("#")[0])]
    assert offences == []


def _header_file(path, header: bytes, length: int | None = None, data: bytes = b"") -> pathlib.Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


@pytest.mark.parametrize("case, why", [
    ("short", r"it is 5 bytes long, too short for the 8-byte header length"),
    ("past_end", r"its header length 4,096 runs past the end of the 21-byte file \(truncated\?\)"),
    ("oversized", r"its header length 18,446,744,073,709,551,615 exceeds the format's limit of 100,000,000 bytes"),
    ("not_json", r"its header is not JSON \(Expecting value: line 1 column 1 \(char 0\)\)"),
    ("array", r"its header is a JSON list, not an object"),
    ("entry", r"its header entry for 'w' is not \{dtype, shape, data_offsets\}: \{'dtype': 'F32'\}"),
    ("offsets", r"tensor 'w' lies at bytes \[0, 64\) of a 16-byte data section"),
])
def test_a_bad_safetensors_header_is_one_sentence(tmp_path, case, why):
    path = tmp_path / "model.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02\x03\x04\x05")
    elif case == "past_end":
        _header_file(path, b'{"a": 1}', length=4096, data=b"12345")
    elif case == "oversized":
        _header_file(path, b"{}", length=2**64 - 1)
    elif case == "not_json":
        _header_file(path, b"\x00garbage")
    elif case == "array":
        _header_file(path, b"[1, 2]")
    elif case == "entry":
        _header_file(path, json.dumps({"w": {"dtype": "F32"}}).encode())
    else:
        entry = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
        _header_file(path, json.dumps(entry).encode(), data=b"\0" * 16)
    with pytest.raises(ValueError) as error:
        safetensors_io.SafetensorsFile(path)
    assert re.fullmatch(rf"{path} is not a valid safetensors file: {why}; download or convert it again\.", str(error.value))


def test_a_truncated_checkpoint_file_is_named_when_loading(huginn_tiny_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(huginn_tiny_dir / "checkpoint", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # the header whole, the last tensors cut off
    with pytest.raises(ValueError, match=rf"^{weights} is not a valid safetensors file: tensor '.*' lies at bytes "):
        huginn.load_hf_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match=r"names shard\(s\) \['../../etc/passwd'\] outside its directory"):
        huginn.load_hf_checkpoint(folder)
    fault_report.record("safetensors header truncated, oversized or not JSON", 9, 9, "0 (one sentence)")
