"""Huginn (huginn-0125) checkpoints in the Hugging Face layout <-> rdlm parameters: the format, nothing else.

    config, params = huginn.load_hf_checkpoint("path/to/checkpoint_dir")   # local or gs://
    huginn.save_hf_checkpoint(config, params, "out_dir")

Both go tensor by tensor, so the full 3.5B model is never in memory twice. The command line that converts
to and from Orbax is `python -m rdlm.interop.convert`.
"""

import dataclasses
import json
import sys
from collections.abc import Callable

import numpy as np

from rdlm import storage
from rdlm.interop import safetensors_io
from rdlm.model.config import ModelConfig, from_hf_config, to_hf_config

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The files beside the weights that a conversion carries across: the tokenizer (huginn's tokenizer.json, or a
# SentencePiece model), its settings and the generation config.
COMPANION_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   GENERATION_CONFIG_FILE)

# (HF stage name, path of the stacked layers in the rdlm params tree)
_STAGES = (("prelude", ("prelude", "layers")), ("core_block", ("core", "core_block", "layers")), ("coda", ("coda", "layers")))


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor: its key and shape, where it lives in rdlm params, and the layout maps both ways."""

    key: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    to_rdlm: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None  # index into the stacked [L, ...] array, None for unstacked params


def _identity(x):
    return x


def _layer_tensors(cfg: ModelConfig, prefix: str, path: tuple[str, ...], layer: int) -> list[_Tensor]:
    D, H, K, F = cfg.n_embd, cfg.n_heads, cfg.head_dim, cfg.intermediate_size
    tensors = [
        _Tensor(f"{prefix}.norm_{j}.weight", (D,), (*path, f"norm_{j}", "scale"), _identity, _identity, layer)
        for j in (1, 2, 3, 4)
    ]
    tensors += [
        # Wqkv rows are [Q | K | V], each (heads, head_dim); rdlm stores [D, 3, H, K].
        _Tensor(
            f"{prefix}.attn.Wqkv.weight", (3 * D, D), (*path, "attn", "wqkv"),
            lambda w: w.reshape(3, H, K, D).transpose(3, 0, 1, 2),
            lambda p: p.transpose(1, 2, 3, 0).reshape(3 * D, D),
            layer,
        ),
        _Tensor(
            f"{prefix}.attn.proj.weight", (D, D), (*path, "attn", "wo"),
            lambda w: w.T.reshape(H, K, D), lambda p: p.reshape(H * K, D).T, layer,
        ),
        # fc rows are [gate | up]; rdlm stores [D, 2, F].
        _Tensor(
            f"{prefix}.mlp.fc.weight", (2 * F, D), (*path, "mlp", "fc"),
            lambda w: w.reshape(2, F, D).transpose(2, 0, 1), lambda p: p.transpose(1, 2, 0).reshape(2 * F, D), layer,
        ),
        _Tensor(f"{prefix}.mlp.proj.weight", (D, F), (*path, "mlp", "proj"), lambda w: w.T, lambda p: p.T, layer),
    ]
    if cfg.qk_bias:
        tensors.append(
            _Tensor(
                f"{prefix}.attn.qk_bias", (2, 1, H, K), (*path, "attn", "qk_bias"),
                lambda w: w.reshape(2, H, K), lambda p: p.reshape(2, 1, H, K), layer,
            )
        )
    return tensors


def tensor_layout(cfg: ModelConfig) -> list[_Tensor]:
    """Every tensor of a Huginn checkpoint of this shape (lm_head and freqs_cis aside)."""
    D, V = cfg.n_embd, cfg.vocab_size
    tensors = [
        _Tensor("transformer.wte.weight", (V, D), ("wte", "embedding"), _identity, _identity),
        _Tensor("transformer.adapter.weight", (D, 2 * D), ("core", "adapter"), lambda w: w.T, lambda p: p.T),
        _Tensor("transformer.ln_f.weight", (D,), ("ln_f", "scale"), _identity, _identity),
    ]
    counts = {
        "prelude": cfg.n_layers_in_prelude,
        "core_block": cfg.n_layers_in_recurrent_block,
        "coda": cfg.n_layers_in_coda,
    }
    for stage, path in _STAGES:
        for i in range(counts[stage]):
            tensors += _layer_tensors(cfg, f"transformer.{stage}.{i}", path, i)
    return tensors


def freqs_cis(cfg: ModelConfig) -> np.ndarray:
    """The reference's persistent RoPE buffer [1, block_size, 1, K/2, 2] of (cos, sin), float32."""
    K = cfg.head_dim
    inv_freq = 1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, K, 2, dtype=np.float32) / np.float32(K)))
    angles = np.outer(np.arange(cfg.block_size, dtype=np.float32), inv_freq.astype(np.float32))
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None, :, None].astype(np.float32)


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree, path, value):
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def read_config(path) -> ModelConfig:
    """The ModelConfig from a Huginn checkpoint directory's config.json."""
    path = storage.path(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist{storage.missing_reason(path)}.")
    config_file = path / CONFIG_FILE
    if not storage.exists(config_file):
        raise FileNotFoundError(
            f"{path} has no config.json; a Hugging Face Huginn checkpoint directory holds config.json and "
            "model.safetensors (or an index with shards)."
        )
    try:
        hf = json.loads(storage.read_text(config_file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}.") from None
    return from_hf_config(hf)


def load_hf_checkpoint(path, dtype=None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a Huginn checkpoint directory; params are NumPy arrays in rdlm layout.

    Tensors are converted one at a time from memory-mapped files into the stacked arrays, so the
    host holds one copy of the model. `dtype` (e.g. "float32") converts; by default the file's dtype
    is kept.
    """
    config = read_config(path)
    tensors = safetensors_io.CheckpointTensors(path)
    layout = tensor_layout(config)
    _check_keys(path, tensors, layout)
    _check_tied_head(path, tensors)
    file_dtype = np.dtype(tensors[layout[0].key].dtype)
    target = np.dtype(dtype) if dtype is not None else file_dtype
    counts = _layer_counts(config)
    params: dict = {}
    for t in layout:
        value = np.asarray(t.to_rdlm(tensors[t.key]), dtype=target)
        if t.layer is None:
            _set(params, t.path, np.ascontiguousarray(value))
            continue
        if t.layer == 0:
            _set(params, t.path, np.empty((counts[t.path[0]], *value.shape), target))
        _get(params, t.path)[t.layer] = value
    config = dataclasses.replace(config, param_dtype=target.name)
    return config, params


def _layer_counts(cfg: ModelConfig) -> dict[str, int]:
    return {"prelude": cfg.n_layers_in_prelude, "core": cfg.n_layers_in_recurrent_block, "coda": cfg.n_layers_in_coda}


def _check_keys(path, tensors, layout):
    for t in layout:
        if t.key not in tensors:
            raise ValueError(f"{path}: tensor {t.key!r} (shape {t.hf_shape}) is missing from the checkpoint.")
        if tensors.shape(t.key) != t.hf_shape:
            raise ValueError(
                f"{path}: tensor {t.key!r} has shape {tensors.shape(t.key)}; config.json implies {t.hf_shape}."
            )
    unexpected = sorted(set(tensors) - {t.key for t in layout} - {"lm_head.weight", "freqs_cis"})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for this config.json: {unexpected[:8]}.")


def _check_tied_head(path, tensors):
    if "lm_head.weight" not in tensors:
        return
    head, wte = tensors["lm_head.weight"], tensors["transformer.wte.weight"]
    if head.shape != wte.shape or not np.array_equal(head, wte):
        raise ValueError(f"{path}: lm_head.weight differs from transformer.wte.weight; rdlm needs tied embeddings.")


def save_hf_checkpoint(config: ModelConfig, params, path, dtype=None) -> None:
    """Writes config.json, generation_config.json and model.safetensors in the reference layout.

    Tensors are converted and written one at a time; `dtype` converts (default: the params' dtype).
    """
    path = storage.makedirs(path)
    layout = tensor_layout(config)
    first = np.asarray(_get(params, layout[0].path))
    target = np.dtype(dtype) if dtype is not None else first.dtype
    thunks, shapes, dtypes = {}, {}, {}
    for t in layout:
        thunks[t.key] = lambda t=t: _to_hf(params, t)
        shapes[t.key], dtypes[t.key] = t.hf_shape, target
    thunks["freqs_cis"] = lambda: freqs_cis(config)
    shapes["freqs_cis"], dtypes["freqs_cis"] = (1, config.block_size, 1, config.head_dim // 2, 2), np.float32
    safetensors_io.write_file(path / safetensors_io.SINGLE_FILE, thunks, shapes, dtypes, metadata={"format": "pt"})
    hf = to_hf_config(config)
    hf["torch_dtype"] = "bfloat16" if target.name == "bfloat16" else str(target)
    storage.write_text(path / CONFIG_FILE, json.dumps(hf, indent=2) + "\n")
    storage.write_text(path / GENERATION_CONFIG_FILE, json.dumps({"_from_model_config": True}, indent=2) + "\n")


def _to_hf(params, t: _Tensor) -> np.ndarray:
    value = np.asarray(_get(params, t.path))
    if t.layer is not None:
        value = value[t.layer]
    return t.to_hf(value)


if __name__ == "__main__":
    print("rdlm.interop.huginn is the checkpoint format, not a command; convert with\n"
          "  python -m rdlm.interop.convert to-orbax SRC_HF_DIR DST_ORBAX_DIR\n"
          "  python -m rdlm.interop.convert to-hf SRC_CHECKPOINT DST_HF_DIR", file=sys.stderr)
    sys.exit(2)
