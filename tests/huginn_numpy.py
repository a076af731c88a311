"""An independent float64 NumPy forward of Huginn that reads Hugging Face tensors directly.

Written from the spec alone (no rdlm code), it is checked against the reference fixture and then
serves as the reference for checkpoints of other shapes.
"""

import json
import pathlib

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x_SHK, base):
    S, _, K = x_SHK.shape
    inv = 1.0 / base ** (np.arange(0, K, 2) / K)
    ang = np.arange(S)[:, None] * inv[None]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x0, x1 = x_SHK[..., 0::2], x_SHK[..., 1::2]
    out = np.empty_like(x_SHK)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x1 * cos + x0 * sin
    return out


def _block(t, prefix, x_SD, cfg):
    D, H = cfg["n_embd"], cfg["n_heads"]
    K, eps = D // H, cfg["norm_eps"]
    S = x_SD.shape[0]
    h = _rms(x_SD, t[f"{prefix}.norm_1.weight"], eps)
    q, k, v = np.split(h @ t[f"{prefix}.attn.Wqkv.weight"].T, 3, axis=-1)
    q, k, v = (a.reshape(S, H, K) for a in (q, k, v))
    if cfg.get("qk_bias", True):
        bias = t[f"{prefix}.attn.qk_bias"]
        q, k = q + bias[0, 0], k + bias[1, 0]
    q, k = _rope(q, cfg["rope_base"]), _rope(k, cfg["rope_base"])
    scores = np.einsum("shk,thk->hst", q, k) / np.sqrt(K)
    scores = np.where(np.tril(np.ones((S, S), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("hst,thk->shk", probs, v).reshape(S, D) @ t[f"{prefix}.attn.proj.weight"].T
    x_SD = _rms(attn + x_SD, t[f"{prefix}.norm_2.weight"], eps)
    gate, up = np.split(_rms(x_SD, t[f"{prefix}.norm_3.weight"], eps) @ t[f"{prefix}.mlp.fc.weight"].T, 2, axis=-1)
    mlp = (gate / (1 + np.exp(-gate)) * up) @ t[f"{prefix}.mlp.proj.weight"].T
    return _rms(mlp + x_SD, t[f"{prefix}.norm_4.weight"], eps)


def forward(tensors, cfg, ids_S, state_SD, num_steps):
    """(logits [S, V], latents [S, D]) of one sequence after `num_steps` core iterations from `state_SD`."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    eps, D = cfg["norm_eps"], cfg["n_embd"]
    e = t["transformer.wte.weight"][ids_S] * np.sqrt(D)
    for i in range(cfg["n_layers_in_prelude"]):
        e = _block(t, f"transformer.prelude.{i}", e, cfg)
    s = np.asarray(state_SD, np.float64)
    for _ in range(num_steps):
        s = np.concatenate([s, e], -1) @ t["transformer.adapter.weight"].T
        for i in range(cfg["n_layers_in_recurrent_block"]):
            s = _block(t, f"transformer.core_block.{i}", s, cfg)
    latents = _rms(s, t["transformer.ln_f.weight"], eps)
    y = latents
    for i in range(cfg["n_layers_in_coda"]):
        y = _block(t, f"transformer.coda.{i}", y, cfg)
    y = _rms(y, t["transformer.ln_f.weight"], eps)
    return y @ t["transformer.wte.weight"].T, latents


def random_checkpoint(directory, *, n_embd, n_heads, layers, intermediate_size, vocab_size, block_size, seed=0):
    """Writes a random Huginn checkpoint of the given shape in the reference layout; returns (tensors, cfg)."""
    from rdlm.interop import safetensors_io

    rng = np.random.default_rng(seed)
    D, F, V, K = n_embd, intermediate_size, vocab_size, n_embd // n_heads
    cfg = {
        "n_embd": D, "n_heads": n_heads, "num_key_value_heads": n_heads, "intermediate_size": F,
        "vocab_size": V, "padded_vocab_size": V, "block_size": block_size, "rope_base": 50000,
        "norm_eps": 1e-6, "qk_bias": True, "tie_embeddings": True, "injection_type": "linear",
        "n_layers_in_prelude": layers[0], "n_layers_in_recurrent_block": layers[1], "n_layers_in_coda": layers[2],
        "mean_recurrence": 4, "mean_backprop_depth": 2, "model_type": "huginn_raven", "torch_dtype": "float32",
    }
    shapes = {"transformer.wte.weight": (V, D), "transformer.adapter.weight": (D, 2 * D), "transformer.ln_f.weight": (D,)}
    for stage, count in zip(("prelude", "core_block", "coda"), layers):
        for i in range(count):
            p = f"transformer.{stage}.{i}"
            shapes.update({f"{p}.norm_{j}.weight": (D,) for j in (1, 2, 3, 4)})
            shapes.update({
                f"{p}.attn.Wqkv.weight": (3 * D, D), f"{p}.attn.qk_bias": (2, 1, n_heads, K),
                f"{p}.attn.proj.weight": (D, D), f"{p}.mlp.fc.weight": (2 * F, D), f"{p}.mlp.proj.weight": (D, F),
            })
    tensors = {}
    for key, shape in shapes.items():
        if "norm_" in key or "ln_f" in key:
            tensors[key] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[key] = (rng.standard_normal(shape) * (0.1 if "qk_bias" in key else np.sqrt(2 / (5 * D)))).astype(np.float32)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    thunks = {k: (lambda v=v: v) for k, v in tensors.items()}
    safetensors_io.write_file(
        directory / "model.safetensors", thunks, {k: v.shape for k, v in tensors.items()}, {k: np.float32 for k in tensors}
    )
    (directory / "config.json").write_text(json.dumps(cfg))
    return tensors, cfg
