"""The recurrent KV cache: one entry per prelude layer, per (core layer, iteration slot) and per coda layer.

Row b's token at position p lives in cache slot p of that row (no padding inside the cache), so a
row's valid keys are exactly the slots below its length, and rows may advance at different speeds.

Core entries: a token run for R iterations writes iteration i into slot i mod C, with C = R (one
slot per iteration, the reference's `full`) or C = kv_share (KV sharing, paper section 6.2). The
reference's `compress-s{c}` counts core-layer slots, so kv_share=C is its `compress-s{C * n_core}`
(e.g. the notebooks' s16 is kv_share=4 for huginn's 4 core layers; the vLLM plugin's s4 is kv_share=1).

A token that stops early (adaptive exit, or a cheap draft) behaves as if its state had reached a
fixed point: its last computed core entry is copied into every slot of the iterations it skipped,
so a later token at iteration i reads the deepest entry that token wrote (the reference's
`latest-m4` lookup, "attend to the deepest available KV"). With KV sharing as well, the slots of the
skipped iterations get that entry too; the reference instead leaves whatever iteration below the
exit wrote the slot last.
"""

import flax
import jax
import jax.numpy as jnp

from rdlm.model.config import ModelConfig

KV = tuple[jax.Array, jax.Array]


@flax.struct.dataclass
class KVCache:
    # Heads before positions, so that a query's dot products read each head's keys as stored (a
    # [.., T, H, K] cache makes XLA transpose every layer's keys and values once per iteration).
    prelude: KV  # (k, v), each [Lp, B, H, T, K]
    core: KV  # (k, v), each [C, Lc, B, H, T, K]
    coda: KV  # (k, v), each [Lk, B, H, T, K]
    depth: int = flax.struct.field(pytree_node=False)  # R: iterations of a full-depth token

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, depth: int, kv_share: int | None = None):
        slots = depth if kv_share is None else min(kv_share, depth)
        H, K, dtype = config.n_heads, config.head_dim, config.compute_dtype

        def zeros(*lead):
            shape = (*lead, batch, H, length, K)
            return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

        return cls(
            prelude=zeros(config.n_layers_in_prelude),
            core=zeros(slots, config.n_layers_in_recurrent_block),
            coda=zeros(config.n_layers_in_coda),
            depth=depth,
        )

    @property
    def slots(self) -> int:
        return self.core[0].shape[0]

    @property
    def length(self) -> int:
        return self.core[0].shape[4]

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))

    @property
    def core_nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.core)

    def past_mask(self, start_B, positions_BS, window: int | None):
        """[B, S, T]: query s may see cached key t (t < the row's start, and inside the window)."""
        t_T = jnp.arange(self.length)
        mask = t_T[None, None, :] < start_B[:, None, None]
        if window is not None:
            mask &= positions_BS[:, :, None] - t_T[None, None, :] < window
        return jnp.broadcast_to(mask, (*positions_BS.shape, self.length))

    def core_slot(self, slot) -> KV:
        """The stacked core-layer (k, v) of one iteration slot, [Lc, B, H, T, K] each."""
        return tuple(jax.lax.dynamic_index_in_dim(x, slot, axis=0, keepdims=False) for x in self.core)

    def write_prelude(self, kv: KV, positions_BS) -> "KVCache":
        return self.replace(prelude=_write_stage(self.prelude, kv, positions_BS))

    def write_coda(self, kv: KV, positions_BS) -> "KVCache":
        return self.replace(coda=_write_stage(self.coda, kv, positions_BS))

    def write_core(self, slot, kv: KV, positions_BS) -> "KVCache":
        """Writes one iteration's core (k, v) [Lc, B, S, H, K] into `slot` at each row's positions."""
        index = (slot, *_layer_row_head_position(kv, positions_BS))
        return self.replace(core=tuple(c.at[index].set(_heads_first(u), mode="drop") for c, u in zip(self.core, kv)))

    def fill_skipped(self, last_kv: KV, steps_B, positions_BS) -> "KVCache":
        """Copies each row's last core entry into the slots of the iterations it skipped.

        Slot j finally holds iteration i_j, the last iteration below R with i_j = j mod C; a row that
        ran `steps` < R iterations did not compute i_j when i_j >= steps, so it gets the last entry.
        """
        C = self.slots
        j_C = jnp.arange(C)
        last_iter_C = j_C + C * ((self.depth - 1 - j_C) // C)
        skipped_CB = last_iter_C[:, None] >= steps_B[None, :]
        index = (slice(None), *_layer_row_head_position(last_kv, positions_BS))
        new = []
        for c, u in zip(self.core, last_kv):
            region = c.at[index].get(mode="fill", fill_value=0)  # [C, L, B, H, S, K]
            region = jnp.where(skipped_CB[:, None, :, None, None, None], _heads_first(u)[None], region)
            new.append(c.at[index].set(region, mode="drop"))
        return self.replace(core=tuple(new))


def _write_stage(cache: KV, kv: KV, positions_BS) -> KV:
    """Writes a stage's stacked (k, v) [L, B, S, H, K] at each row's positions of [L, B, H, T, K]."""
    index = _layer_row_head_position(kv, positions_BS)
    return tuple(c.at[index].set(_heads_first(u), mode="drop") for c, u in zip(cache, kv))


def _heads_first(x_LBSHK: jax.Array) -> jax.Array:
    return x_LBSHK.swapaxes(2, 3)


def _layer_row_head_position(kv: KV, positions_BS):
    """Indices of the [L, B, H, S] entries that the layers' (k, v) [L, B, S, H, K] go to in a cache [.., L, B, H, T, K]."""
    L, B, S, H = kv[0].shape[:4]
    return (
        jnp.arange(L)[:, None, None, None],
        jnp.arange(B)[None, :, None, None],
        jnp.arange(H)[None, None, :, None],
        positions_BS[None, :, None, :],
    )
