"""Hugging Face checkpoints: bit-exact round trips, the Orbax converters, and clear errors."""

import json
import shutil

import jax
import numpy as np
import pytest

import huginn_numpy
from rdlm import checkpoint_io
from rdlm.interop import huginn, safetensors_io


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


def test_orbax_converters_round_trip(huginn_tiny_dir, tmp_path):
    assert huginn.main(["to-orbax", str(huginn_tiny_dir / "checkpoint"), str(tmp_path / "orbax")]) == 0
    assert huginn.main(["to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    _, original = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    config, via_orbax = checkpoint_io.load_params(tmp_path / "orbax")
    _assert_same_tree(original, via_orbax)
    _, back = huginn.load_hf_checkpoint(tmp_path / "hf")
    _assert_same_tree(original, back)
    assert checkpoint_io.kind_of(tmp_path / "orbax") == "step"
    assert checkpoint_io.kind_of(tmp_path / "hf") == "hf"


def test_converter_refuses_to_overwrite(huginn_tiny_dir, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert huginn.main(["to-orbax", str(huginn_tiny_dir / "checkpoint"), str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err


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
