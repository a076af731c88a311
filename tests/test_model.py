"""Properties of RecurrentLM that must hold exactly: causality, truncation, padding, one compile."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rdlm.model import ModelConfig, RecurrentLM, sample_num_steps

# Every property here holds at any depth: one prelude and coda layer and two core layers keep compiles short.
CONFIG = ModelConfig.preset("tiny", vocab_size=64, block_size=32, n_layers_in_prelude=1, n_layers_in_recurrent_block=2,
                            n_layers_in_coda=1)


@pytest.fixture(scope="module")
def params():
    ids = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(lambda key: RecurrentLM(CONFIG).init({"params": key}, ids, num_steps=1, init_scale=0.0))
    variables = init(jax.random.key(0))
    # Move the norms and biases off their trivial init so that every term matters.
    return jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), nn.meta.unbox(variables["params"])
    )


def assert_trees_close(a, b, rel=1e-5):
    """Leaf by leaf, the largest difference is small against the leaf's largest value."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.abs(x - y).max() <= rel * max(np.abs(y).max(), 1e-12), (np.abs(x - y).max(), np.abs(y).max())


def test_causal(params):
    """d logits[t] / d (input embedding or initial state at a later position) is exactly zero."""
    model = RecurrentLM(CONFIG)
    ids = jnp.arange(12)[None] + 3
    embeds = model.apply({"params": params}, ids, method=lambda m, i: m.wte.lookup(i))
    s0 = jax.random.normal(jax.random.key(2), (1, 12, CONFIG.n_embd))
    t = 5

    @jax.jit
    def grads(e, s):
        def out_t(e, s):
            return model.apply({"params": params}, input_embeds=e, num_steps=(0, 3), init_state=s).logits[0, t].sum()

        return jax.grad(out_t, argnums=(0, 1))(e, s)

    for g in grads(embeds, s0):
        assert np.all(g[0, t + 1 :] == 0)
        assert np.all(np.abs(g[0, : t + 1]).sum(-1) > 0)
    with_ids = model.apply({"params": params}, ids, num_steps=2, init_state=s0).logits
    with_embeds = model.apply({"params": params}, input_embeds=embeds, num_steps=2, init_state=s0).logits
    np.testing.assert_allclose(with_ids, with_embeds, atol=1e-6)


def _loss(params, ids, num_steps, s0):
    out = RecurrentLM(CONFIG).apply({"params": params}, ids, num_steps=num_steps, init_state=s0)
    return optax.softmax_cross_entropy_with_integer_labels(out.logits, jnp.roll(ids, -1, axis=1)).mean()


# One compiled program per (no-grad, grad) split: eager dispatch of the scanned core compiles every primitive.
_grad = jax.jit(jax.grad(_loss), static_argnums=2)
_state_grad = jax.jit(jax.grad(_loss, argnums=3), static_argnums=2)


def test_truncated_backprop_equals_k_steps_from_stopped_state(params):
    ids = jax.random.randint(jax.random.key(3), (2, 10), 0, CONFIG.vocab_size)
    s0 = jax.random.normal(jax.random.key(4), (2, 10, CONFIG.n_embd))
    s5 = jax.jit(lambda p: RecurrentLM(CONFIG).apply({"params": p}, ids, num_steps=5, init_state=s0).state)(params)
    g_truncated = _grad(params, ids, (5, 2), s0)
    g_reference = _grad(params, ids, (0, 2), jax.lax.stop_gradient(s5))
    assert_trees_close(g_truncated, g_reference, rel=1e-4)
    # ... and differs from backprop through all 7 steps.
    g_full = _grad(params, ids, (0, 7), s0)
    assert not np.allclose(g_full["core"]["adapter"], g_truncated["core"]["adapter"], rtol=1e-3)


def test_state_gets_no_gradient_through_no_grad_steps(params):
    ids = jnp.ones((1, 6), jnp.int32)
    s0 = jax.random.normal(jax.random.key(5), (1, 6, CONFIG.n_embd))
    g = _state_grad(params, ids, (3, 2), s0)
    assert np.all(g == 0)
    g = _state_grad(params, ids, (0, 2), s0)
    assert np.abs(g).sum() > 0


def test_traced_k_matches_static_k(params):
    ids = jax.random.randint(jax.random.key(6), (1, 8), 0, CONFIG.vocab_size)
    s0 = jax.random.normal(jax.random.key(7), (1, 8, CONFIG.n_embd))
    static = jax.jit(jax.value_and_grad(_loss), static_argnums=2)(params, ids, (2, 3), s0)
    traced = jax.jit(jax.value_and_grad(_loss))(params, ids, (jnp.int32(2), jnp.int32(3)), s0)
    # The two programs differ only in XLA's fusion order: about 1e-5 of a leaf's scale.
    assert_trees_close(static, traced, rel=5e-5)


def test_unstacked_layers_give_the_stacked_outputs(params):
    """Decoding runs the stages as a Python loop over per-layer parameters (rdlm.model.layers.unstack_layers)."""
    from rdlm.model.layers import unstack_layers

    ids = jax.random.randint(jax.random.key(8), (2, 8), 0, CONFIG.vocab_size)
    unstacked = unstack_layers(params)
    assert "layers" not in unstacked["core"]["core_block"] and "layer_1" in unstacked["core"]["core_block"]

    def run(p, num_steps):
        return RecurrentLM(CONFIG).apply({"params": p}, ids, num_steps=num_steps, init_scale=0.0).logits

    np.testing.assert_array_equal(run(unstacked, 0), run(params, 0))  # prelude and coda: the same ops
    assert_trees_close(run(unstacked, 3), run(params, 3))  # the core's fusions differ: float32 rounding


def test_one_compile_for_every_n(params):
    ids = jnp.ones((1, 8), jnp.int32)
    s0 = jnp.zeros((1, 8, CONFIG.n_embd))
    step = jax.jit(jax.value_and_grad(lambda p, n: _loss(p, ids, (n, 2), s0)))
    losses = [float(step(params, jnp.int32(n))[0]) for n in (0, 7, 150)]
    assert step._cache_size() == 1
    assert len(set(losses)) == 3


def test_temp_memory_does_not_grow_with_n(params):
    ids = jnp.ones((4, 32), jnp.int32)
    s0 = jnp.zeros((4, 32, CONFIG.n_embd))

    def temp_bytes(n):
        step = jax.jit(jax.grad(lambda p: _loss(p, ids, (n, 4), s0)))
        return step.lower(params).compile().memory_analysis().temp_size_in_bytes

    at_0, at_64 = temp_bytes(0), temp_bytes(64)
    assert abs(at_64 - at_0) <= 0.1 * at_0, (at_0, at_64)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_match_rows_alone(params, side):
    model = RecurrentLM(CONFIG)
    rows = [np.arange(1, 10), np.arange(20, 25), np.arange(30, 37)]
    S = 9
    ids, mask = np.zeros((3, S), np.int32), np.zeros((3, S), np.int32)
    for b, row in enumerate(rows):
        sl = slice(S - len(row), S) if side == "left" else slice(0, len(row))
        ids[b, sl], mask[b, sl] = row, 1
    batch = model.apply({"params": params}, ids, num_steps=3, init_scale=0.0, attention_mask=mask)
    for b, row in enumerate(rows):
        alone = model.apply({"params": params}, row[None], num_steps=3, init_scale=0.0)
        got = batch.logits[b][mask[b] == 1]
        np.testing.assert_allclose(got, alone.logits[0], rtol=1e-5, atol=1e-4)


def test_packed_segments_do_not_see_each_other(params):
    model = RecurrentLM(CONFIG)
    a, b = np.arange(1, 6), np.arange(40, 47)
    ids = np.concatenate([a, b])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    packed = model.apply({"params": params}, ids, num_steps=2, init_scale=0.0, segment_ids=segments, positions=positions)
    alone = model.apply({"params": params}, b[None], num_steps=2, init_scale=0.0)
    np.testing.assert_allclose(packed.logits[0, 5:], alone.logits[0], rtol=1e-5, atol=1e-4)


def test_random_initial_state_needs_rng_and_varies(params):
    model = RecurrentLM(CONFIG)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params}, ids, num_steps=1)
    a = model.apply({"params": params}, ids, num_steps=1, rngs={"state": jax.random.key(0)}).logits
    b = model.apply({"params": params}, ids, num_steps=1, rngs={"state": jax.random.key(1)}).logits
    assert not np.allclose(a, b)


def test_initial_state_statistics():
    from rdlm.model import recurrence

    cfg = ModelConfig.preset("tiny", n_embd=256, n_heads=4)
    s = recurrence.initial_state(cfg, jax.random.key(0), (64, 64, 256), 1.0)
    # The reference's draw has per-element std about sqrt(2/5) * 0.986 (truncation at 3 sigma).
    assert abs(float(jnp.std(s)) - np.sqrt(2 / 5) * 0.9866) < 0.005
    assert float(jnp.max(jnp.abs(s))) <= 3 * np.sqrt(2 / 5) + 1e-5


def test_recurrence_sampler_matches_paper():
    n, k = jax.vmap(lambda step: sample_num_steps(jax.random.key(0), step, 32, 8))(jnp.arange(200_000))
    r = np.asarray(n + k)
    assert np.all(k == np.minimum(8, r)) and np.all(n == np.maximum(r - 8, 0))
    assert abs(r.mean() - 33) < 0.15  # E[r] = rbar + 1
    assert abs(np.median(r) - 29) <= 1  # paper Fig. 3
    counts = np.bincount(r)
    assert abs(int(np.argmax(counts)) - 24) <= 2
    assert r.max() > 120


def test_sampler_is_the_same_on_every_host_for_a_step():
    """Hosts share the rng and the step, and nothing else, so they draw the same r."""
    draws = [tuple(int(x) for x in sample_num_steps(jax.random.key(0), 17, 32, 8)) for _ in range(2)]
    assert draws[0] == draws[1]
    per_step = {tuple(int(x) for x in sample_num_steps(jax.random.key(0), step, 32, 8)) for step in range(20)}
    assert len(per_step) > 5


def test_3b5_unique_parameter_count():
    config = ModelConfig.preset("3b5")
    shapes = jax.eval_shape(
        lambda: RecurrentLM(config).init({"params": jax.random.key(0)}, jnp.ones((1, 8), jnp.int32), num_steps=1, init_scale=0.0)
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == 3_564_976_800


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=np.array([[1, 64]])), r"Token ids must lie in \[0, 64\); got ids from 1 to 64"),
        (dict(input_ids=np.ones((1, 33), np.int32)), "Sequence length 33 exceeds the positions table"),
        (dict(input_ids=np.ones((1, 4), np.int32), num_steps=-1), "num_steps must be non-negative; got n=-1"),
        (dict(input_ids=np.ones((1, 4), np.int32), num_steps=(2, -3)), "got k=-3"),
        (dict(input_ids=np.ones((4,), np.int32)), r"input_ids must be \[batch, seq\]"),
    ],
)
def test_bad_input_gets_one_clear_sentence(params, kwargs, message):
    kwargs.setdefault("num_steps", 1)
    with pytest.raises(ValueError, match=message):
        RecurrentLM(CONFIG).apply({"params": params}, init_scale=0.0, **kwargs)
