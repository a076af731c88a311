"""Hugging Face checkpoints: bit-exact round trips, the Orbax converters, and clear errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import huginn_numpy
import huginn_tokenizer
from rdlm import checkpoint_io
from rdlm.interop import convert, huginn, safetensors_io
from rdlm.sampling import text

REPO = pathlib.Path(__file__).resolve().parents[1]


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_save_load_round_trip_is_bit_exact(huginn_tiny_dir, tmp_path):
    config, params = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    huginn.save_hf_checkpoint(config, params, tmp_path / "hf")
    config2, params2 = huginn.load_hf_checkpoint(tmp_path / "hf")
    assert config2 == config
    _assert_same_tree(params, params2)
    original = safetensors_io.CheckpointTensors(huginn_tiny_dir / "checkpoint")
    written = safetensors_io.CheckpointTensors(tmp_path / "hf")
    for key in original:
        if key != "freqs_cis":
            assert np.array_equal(original[key], written[key]), key
    np.testing.assert_allclose(written["freqs_cis"], original["freqs_cis"], atol=2e-6)


def test_bf16_and_sharded_checkpoints_load(huginn_tiny_dir, tmp_path):
    config, params = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    huginn.save_hf_checkpoint(config, params, tmp_path / "bf16", dtype="bfloat16")
    # Split the bf16 file into two shards with an index, and add a tied lm_head as some exports do.
    single = safetensors_io.CheckpointTensors(tmp_path / "bf16")
    keys = sorted(single)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    out = tmp_path / "sharded"
    out.mkdir()
    weight_map = {}
    for name, shard_keys in shards.items():
        tensors = {k: single[k] for k in shard_keys}
        if name.startswith("model-00002"):
            tensors["lm_head.weight"] = single["transformer.wte.weight"]
        safetensors_io.write_file(
            out / name, {k: (lambda v=v: v) for k, v in tensors.items()}, {k: v.shape for k, v in tensors.items()},
            {k: v.dtype for k, v in tensors.items()},
        )
        weight_map.update({k: name for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tmp_path / "bf16" / "config.json", out / "config.json")
    config_bf16, params_bf16 = huginn.load_hf_checkpoint(out)
    assert config_bf16.param_dtype == "bfloat16"
    _assert_same_tree(params_bf16, jax.tree.map(lambda x: np.asarray(x).astype("bfloat16"), params))
    _, params_f32 = huginn.load_hf_checkpoint(out, dtype="float32")
    assert jax.tree.leaves(params_f32)[0].dtype == np.float32


def _hf_dir_with_tokenizer(huginn_tiny_dir, folder):
    """The fixture checkpoint plus a huginn-style tokenizer.json and a generation config naming an EOS id."""
    shutil.copytree(huginn_tiny_dir / "checkpoint", folder)
    huginn_tokenizer.write(folder / "tokenizer.json")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7, "bos_token_id": 500}))
    return folder


def test_orbax_converters_round_trip_weights_tokenizer_and_generation_config(huginn_tiny_dir, tmp_path):
    hf = _hf_dir_with_tokenizer(huginn_tiny_dir, tmp_path / "src")
    convert.convert("to-orbax", str(hf), str(tmp_path / "orbax"))
    convert.convert("to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"))
    _, original = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    config, via_orbax = checkpoint_io.load_params(tmp_path / "orbax")
    _assert_same_tree(original, via_orbax)
    _, back = huginn.load_hf_checkpoint(tmp_path / "hf")
    _assert_same_tree(original, back)
    assert checkpoint_io.kind_of(tmp_path / "orbax") == "step"
    assert checkpoint_io.kind_of(tmp_path / "hf") == "hf"
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "orbax" / name).read_bytes() == (hf / name).read_bytes()
        assert (tmp_path / "hf" / name).read_bytes() == (hf / name).read_bytes()
    assert text.tokenizer_path(tmp_path / "orbax") == tmp_path / "orbax" / "tokenizer.json"
    codec = text.load_codec(tmp_path / "orbax")
    assert codec.chat_template and codec.stop_ids == (7, 500, 501, 504) and codec.prompt_ids("w3 w9") == [500, 3, 9]


def test_converter_refuses_to_overwrite(huginn_tiny_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists; choose a new output directory"):
        convert.convert("to-orbax", str(huginn_tiny_dir / "checkpoint"), str(tmp_path / "exists"))


def test_the_old_converter_module_says_how_to_convert_and_bad_arguments_are_one_sentence():
    old = subprocess.run([sys.executable, "-m", "rdlm.interop.huginn", "to-orbax", "a", "b"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert old.returncode == 2 and "python -m rdlm.interop.convert to-orbax SRC_HF_DIR DST_ORBAX_DIR" in old.stderr
    bad = subprocess.run([sys.executable, "-m", "rdlm.interop.convert", "to-gguf", "a", "b"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: expected {to-orbax|to-hf} SRC DST, got ['to-gguf', 'a', 'b']; e.g. python -m rdlm.interop.convert "
        "to-orbax path/to/huginn-0125 checkpoints/huginn-0125."
    ]


def _copy_fixture(huginn_tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(huginn_tiny_dir / "checkpoint", dst)
    return dst


def test_missing_config_json(huginn_tiny_dir, tmp_path):
    dst = _copy_fixture(huginn_tiny_dir, tmp_path)
    (dst / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        huginn.load_hf_checkpoint(dst)


def test_missing_tensor_is_named(huginn_tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    tensors, cfg = huginn_numpy.random_checkpoint(dst, n_embd=32, n_heads=2, layers=(1, 1, 1), intermediate_size=48, vocab_size=50, block_size=16)
    del tensors["transformer.core_block.0.mlp.proj.weight"]
    safetensors_io.write_file(
        dst / "model.safetensors", {k: (lambda v=v: v) for k, v in tensors.items()},
        {k: v.shape for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()},
    )
    with pytest.raises(ValueError, match=r"'transformer.core_block.0.mlp.proj.weight' \(shape \(32, 48\)\) is missing"):
        huginn.load_hf_checkpoint(dst)


def test_misshaped_tensor_names_both_shapes(huginn_tiny_dir, tmp_path):
    dst = _copy_fixture(huginn_tiny_dir, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'transformer.prelude.0.mlp.fc.weight' has shape \(320, 64\); config.json implies \(256, 64\)"):
        huginn.load_hf_checkpoint(dst)


def test_untied_head_is_refused(huginn_tiny_dir, tmp_path):
    dst = tmp_path / "ckpt"
    tensors, _ = huginn_numpy.random_checkpoint(dst, n_embd=32, n_heads=2, layers=(1, 1, 1), intermediate_size=48, vocab_size=50, block_size=16)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    safetensors_io.write_file(
        dst / "model.safetensors", {k: (lambda v=v: v) for k, v in tensors.items()},
        {k: v.shape for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()},
    )
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        huginn.load_hf_checkpoint(dst)


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
        checkpoint_io.load_params(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_io.load_params(tmp_path / "nope")


def _rdlm_imports() -> dict[str, set[str]]:
    """Every rdlm module -> the rdlm modules it imports anywhere in its file (function-local imports too)."""
    import ast

    files = {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (REPO / "rdlm").rglob("*.py")}
    graph = {}
    for name, file in files.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_rdlm_modules_import_each_other_without_cycles():
    graph, state, cycles = _rdlm_imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
    assert "rdlm.checkpoint_io" not in graph["rdlm.interop.huginn"] and "rdlm.orbax_steps" not in graph["rdlm.interop.huginn"]
