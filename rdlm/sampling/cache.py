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
LayerKVs = tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]  # (keys, values), one array per layer


@flax.struct.dataclass
class KVCache:
    # Laid out for the attention matmuls of one query, so that XLA reads the cache as stored instead
    # of transposing every layer's keys and values on every iteration: heads first, keys as [K, T]
    # columns, values as [T, K] rows. A 16-bit float cache is stored as its uint16 bits: XLA CPU
    # upcasts a bf16 dynamic-update-slice by converting the whole cache to float32 and back on every
    # write (10x slower decoding); the bit-cast views cost nothing on any backend.
    prelude: KV  # keys [Lp, B, H, K, T], values [Lp, B, H, T, K]
    core: KV  # keys [C, Lc, B, H, K, T], values [C, Lc, B, H, T, K]
    coda: KV  # keys [Lk, B, H, K, T], values [Lk, B, H, T, K]
    depth: int = flax.struct.field(pytree_node=False)  # R: iterations of a full-depth token
    dtype: str = flax.struct.field(pytree_node=False, default="float32")  # what reads return

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, depth: int, kv_share: int | None = None):
        slots = depth if kv_share is None else min(kv_share, depth)
        H, K = config.n_heads, config.head_dim
        storage = _storage_dtype(config.compute_dtype)

        def zeros(*lead):
            return jnp.zeros((*lead, batch, H, K, length), storage), jnp.zeros((*lead, batch, H, length, K), storage)

        return cls(
            prelude=zeros(config.n_layers_in_prelude),
            core=zeros(slots, config.n_layers_in_recurrent_block),
            coda=zeros(config.n_layers_in_coda),
            depth=depth,
            dtype=jnp.dtype(config.compute_dtype).name,
        )

    def view(self, kv: KV) -> KV:
        """Stored (keys, values) as arrays of the compute dtype."""
        return tuple(_as_dtype(x, self.dtype) for x in kv)

    @property
    def prelude_kv(self) -> KV:
        return self.view(self.prelude)

    @property
    def coda_kv(self) -> KV:
        return self.view(self.coda)

    @property
    def slots(self) -> int:
        return self.core[0].shape[0]

    @property
    def length(self) -> int:
        return self.core[0].shape[-1]

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

    def core_slot(self, slot) -> LayerKVs:
        """Each core layer's (keys, values) of one iteration slot, as per-layer arrays.

        Read layer by layer: a stacked read would be copied once more and then sliced per layer.
        """
        return tuple(tuple(_as_dtype(x[slot, layer], self.dtype) for layer in range(x.shape[1])) for x in self.core)

    def write_prelude(self, kv: KV, positions_BS) -> "KVCache":
        return self.replace(prelude=_write(self.prelude, self._stored(kv), positions_BS))

    def write_coda(self, kv: KV, positions_BS) -> "KVCache":
        return self.replace(coda=_write(self.coda, self._stored(kv), positions_BS))

    def write_core(self, slot, kv: KV, positions_BS) -> "KVCache":
        """Writes one iteration's core (k, v) [Lc, B, S, H, K] into `slot` at each row's positions."""
        return self.replace(core=_write(self.core, self._stored(kv), positions_BS, (slot,)))

    def _stored(self, kv: KV) -> KV:
        return tuple(_as_dtype(x.astype(self.dtype), self.core[0].dtype) for x in kv)

    def fill_skipped(self, last_kv: KV, steps_B, positions_BS) -> "KVCache":
        """Copies each row's last core entry into the slots of the iterations it skipped.

        Slot j finally holds iteration i_j, the last iteration below R with i_j = j mod C; a row that
        ran `steps` < R iterations did not compute i_j when i_j >= steps, so it gets the last entry.
        """
        C = self.slots
        j_C = jnp.arange(C)
        last_iter_C = j_C + C * ((self.depth - 1 - j_C) // C)
        skipped_BC = last_iter_C[None, :] >= steps_B[:, None]
        new = []
        for c, (index, u) in zip(self.core, _window_updates(self._stored(last_kv), positions_BS, (slice(None),))):
            region = c.at[index].get(mode="fill", fill_value=0)  # [B, S, C, L, H, K]
            region = jnp.where(skipped_BC[:, None, :, None, None, None], u[:, :, None], region)
            new.append(c.at[index].set(region, mode="drop"))
        return self.replace(core=tuple(new))


def _storage_dtype(dtype):
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def _as_dtype(x, dtype):
    """x reinterpreted (same bits) as `dtype` when the widths match, else unchanged."""
    dtype = jnp.dtype(dtype)
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _write(cache: KV, kv: KV, positions_BS, lead: tuple = ()) -> KV:
    """Writes the layers' (k, v) [L, B, S, H, K] at each row's positions, below the `lead` indices (a core slot)."""
    return tuple(c.at[index].set(u, mode="drop") for c, (index, u) in zip(cache, _window_updates(kv, positions_BS, lead)))


def _window_updates(kv: KV, positions_BS, lead: tuple):
    """For the layers' (k, v) [L, B, S, H, K]: each one's cache index (after the `lead` indices) and its
    entries [B, S, L, H, K].

    The index picks (row, position) pairs and keeps every layer, head and feature, so XLA writes one
    [L, H, K] window per pair (an index per element would make the scatter compute one per element).
    Array indices on non-adjacent axes put their [B, S] first, before the sliced axes (and before the
    slots, when `lead` slices them).
    """
    B = kv[0].shape[1]
    row_BS = jnp.broadcast_to(jnp.arange(B)[:, None], positions_BS.shape)
    every = slice(None)
    key_index = (*lead, every, row_BS, every, every, positions_BS)  # keys [.., L, B, H, K, T]
    value_index = (*lead, every, row_BS, every, positions_BS, every)  # values [.., L, B, H, T, K]
    u_BSLHK = tuple(x.transpose(1, 2, 0, 3, 4) for x in kv)
    return (key_index, u_BSLHK[0]), (value_index, u_BSLHK[1])
