"""Prompts as a right-padded batch: ids [B, P] and lengths [B], checked against the model's limits."""

import numbers

import jax
import numpy as np

from rdlm.model.config import ModelConfig


def batch_prompts(prompt_ids, prompt_lengths=None, *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P] int32, lengths [B] int32) from a list of lists, one list, or a [B, P] array.

    A [B, P] array (or equal-length lists) is right-padded: row b's prompt is ids[b, :prompt_lengths[b]]
    (all P if None).
    """
    listed = isinstance(prompt_ids, (list, tuple))
    ragged = listed and (not prompt_ids or not isinstance(prompt_ids[0], numbers.Integral))
    if ragged and prompt_lengths is None:
        rows = [np.asarray(row).reshape(-1) for row in prompt_ids]
        if not rows:
            raise ValueError("The prompt batch is empty; give at least one prompt.")
        lengths = np.asarray([len(r) for r in rows], np.int32)
        ids = np.full((len(rows), max(int(lengths.max()), 1)), pad_id, np.int64)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
    else:
        ids = np.asarray(prompt_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"prompt_ids must be [batch, length] or a list of lists; got shape {ids.shape}.")
        if ids.shape[0] == 0:
            raise ValueError("The prompt batch is empty; give at least one prompt.")
        if prompt_lengths is None:
            lengths = np.full((ids.shape[0],), ids.shape[1], np.int32)
        else:
            lengths = np.asarray(prompt_lengths).reshape(-1).astype(np.int64)
            if lengths.shape[0] != ids.shape[0]:
                raise ValueError(f"prompt_lengths has {lengths.shape[0]} entries for {ids.shape[0]} prompts.")
            if lengths.size and (lengths.min() < 0 or lengths.max() > ids.shape[1]):
                raise ValueError(
                    f"prompt_lengths {lengths.tolist()} must lie in [1, {ids.shape[1]}] (the padded width)."
                )
            lengths = lengths.astype(np.int32)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids; got dtype {ids.dtype}.")
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise ValueError(f"Prompt {int(empty[0])} is empty; give at least one token (e.g. BOS).")
    valid = np.arange(ids.shape[1])[None] < lengths[:, None]
    ids = np.where(valid, ids, pad_id)
    return ids.astype(np.int32), lengths


def check_fits(config: ModelConfig, ids: np.ndarray, lengths: np.ndarray, max_new_tokens) -> None:
    """Raises one clear ValueError when the prompts or the new tokens do not fit the model."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
    longest = int(lengths.max())
    if longest > config.block_size:
        raise ValueError(
            f"Prompt length {longest} exceeds the positions table (block_size={config.block_size}); "
            "shorten the prompt."
        )
    if longest + max_new_tokens > config.block_size:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} after a {longest}-token prompt overflows "
            f"block_size={config.block_size}; at most {config.block_size - longest} new tokens fit."
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"Prompt token ids must lie in [0, {config.vocab_size}); got ids from {lo} to {hi}.")


def prepare_prompts(config: ModelConfig, prompt_ids, prompt_lengths, max_new_tokens: int, rng, *, pad_id: int):
    """(ids [B, P], lengths [B], rng) for a sampler: batched, checked against the positions table, and
    rng defaulting to key(0)."""
    ids, lengths = batch_prompts(prompt_ids, prompt_lengths, pad_id=pad_id)
    check_fits(config, ids, lengths, max_new_tokens)
    return ids, lengths, jax.random.key(0) if rng is None else rng
