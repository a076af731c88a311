"""rdlm.optim against a NumPy port of the reference ELLISAdam step (recpre/optim.py 907-1035)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rdlm import optim

B1, B2, EPS = 0.9, 0.95, 1e-6


def make_config(**optim_overrides):
    config = ml_collections.ConfigDict()
    config.optim = dict(
        name="adam_atan2",
        lr=1e-2,
        b1=B1,
        b2=B2,
        eps=1e-8,
        weight_decay=0.05,
        grad_clip=1.0,
        schedule="warmup_constant",
        warmup_steps=3,
        decay_fraction=0.2,
        decay_shape="linear",
        min_lr_ratio=0.0,
        update_clipping=True,
        running_init=True,
    )
    config.optim.update(optim_overrides)
    config.train = dict(num_steps=100, grad_accum_steps=1)
    return config


def fake_params():
    rng = np.random.default_rng(0)
    shapes = {
        "wte": {"embedding": (8, 4)},
        "prelude_0": {
            "norm_1": {"scale": (4,)},
            "attn": {"qkv": {"kernel": (4, 6)}, "qk_bias": (2, 1, 3)},
        },
        "adapter": {"kernel": (8, 4)},
        "ln_f": {"scale": (4,)},
    }
    return jax.tree.map(
        lambda s: rng.normal(size=s).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def fake_grads(params, step):
    """Small gradients, a 100x spike at step 2 (update clipping), a zero and a 1e-8 entry."""
    rng = np.random.default_rng(100 + step)
    grads = jax.tree.map(lambda p: (0.01 * rng.normal(size=p.shape)).astype(np.float32), params)
    if step == 2:
        grads = jax.tree.map(lambda g: 100 * g, grads)
    grads["adapter"]["kernel"][0, 0] = 0.0
    grads["adapter"]["kernel"][0, 1] = 1e-8
    return grads


class ReferenceEllisAdam:
    """Line-by-line NumPy port of the reference step with the main run's flags."""

    def __init__(self, lr, wd, mask):
        self.peak_lr, self.wd, self.mask = lr, wd, mask
        self.m, self.v, self.t = None, None, 0
        self.max_rms = 0.0

    def step(self, params, grads, lr):
        if self.m is None:  # running_init: state created from the first gradient (lines 825-830)
            self.m = jax.tree.map(lambda g: g.copy(), grads)
            self.v = jax.tree.map(lambda g: g * g, grads)
        self.t += 1
        bc1, bc2 = 1 - B1**self.t, 1 - B2**self.t

        def leaf(p, g, m, v, decays):
            m[...] = m + (1 - B1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
            v[...] = v * B2 + (1 - B2) * g * g
            np.maximum(v, EPS**2, out=v)  # clamp_ in place
            rms = np.sqrt(np.mean(g**2 / v))
            self.max_rms = max(self.max_rms, rms)
            step_size = lr / max(rms, 1.0) / bc1
            p = p * (1 - lr / self.peak_lr * self.wd) if decays else p
            return p - step_size * np.arctan2(m, np.sqrt(v) / np.sqrt(bc2))

        return jax.tree.map(leaf, params, grads, self.m, self.v, self.mask)


def clip_global(grads, max_norm):
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: g * np.float32(min(1.0, max_norm / norm)), grads)


def test_weight_decay_mask_follows_paths():
    mask = optim.weight_decay_mask(fake_params())
    assert mask == {
        "wte": {"embedding": True},
        "prelude_0": {
            "norm_1": {"scale": False},
            "attn": {"qkv": {"kernel": True}, "qk_bias": False},
        },
        "adapter": {"kernel": True},
        "ln_f": {"scale": False},
    }
    abstract = jax.eval_shape(lambda: fake_params())
    assert optim.weight_decay_mask(abstract) == mask
    with pytest.raises(ValueError, match="prelude_0/mystery"):
        optim.weight_decay_mask({"prelude_0": {"mystery": np.zeros(3)}})


def test_make_optimizer_matches_reference_rule():
    config = make_config()
    params = fake_params()
    mask = optim.weight_decay_mask(params)
    tx = optim.make_optimizer(config)
    schedule = optim.make_schedule(config)
    reference = ReferenceEllisAdam(config.optim.lr, config.optim.weight_decay, mask)

    @jax.jit
    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    ours = ref = params
    for step in range(5):
        grads = fake_grads(params, step)
        ours, state = update(grads, state, ours)
        ref = reference.step(ref, clip_global(grads, 1.0), float(schedule(step)))
        np.testing.assert_allclose(
            np.concatenate([x.ravel() for x in jax.tree.leaves(ours)]),
            np.concatenate([x.ravel() for x in jax.tree.leaves(ref)]),
            rtol=2e-6,
            atol=1e-7,
            err_msg=f"step {step}",
        )
        if step == 0:  # running init: |update| is lr * atan(sqrt(1 - b2)) / (1 - b1) everywhere
            delta = np.asarray(params["prelude_0"]["attn"]["qkv"]["kernel"]) * (
                1 - 1e-2 / 3 / 1e-2 * 0.05
            ) - np.asarray(ours["prelude_0"]["attn"]["qkv"]["kernel"])
            np.testing.assert_allclose(
                np.abs(delta), 1e-2 / 3 * np.arctan(np.sqrt(1 - B2)) / (1 - B1), rtol=1e-5
            )
    assert reference.max_rms > 3.0, "the gradient spike should trigger update clipping"
    assert state[1].count.dtype == jnp.int32 and int(state[1].count) == 5


def test_adam_atan2_without_clipping_or_running_init():
    params = fake_params()["prelude_0"]["attn"]
    tx = optim.adam_atan2(0.1, B1, B2, update_clipping=False, running_init=False)
    state = tx.init(params)
    m = v = 0.0
    for step in range(3):
        g = fake_grads(fake_params(), step)["prelude_0"]["attn"]
        updates, state = tx.update(g, state, params)
        gk = g["qkv"]["kernel"]
        m, v = B1 * m + (1 - B1) * gk, B2 * v + (1 - B2) * gk * gk
        t = step + 1
        expected = -0.1 / (1 - B1**t) * np.arctan2(m, np.sqrt(v) / np.sqrt(1 - B2**t))
        np.testing.assert_allclose(updates["qkv"]["kernel"], expected, rtol=1e-5)


def test_state_is_arrays_and_shards():
    params = fake_params()
    tx = optim.make_optimizer(make_config(grad_clip=0.0))
    state = tx.init(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def spec(x):
        return P("data") if x.ndim and x.shape[0] % 8 == 0 else P()

    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    state = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), state)
    grads = fake_grads(fake_params(), 0)
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert updates["wte"]["embedding"].sharding.spec == P("data")
    assert int(state[1].count) == 1


def test_multisteps_averages_microbatches():
    params = fake_params()
    g1, g2 = fake_grads(params, 0), fake_grads(params, 1)
    accumulated = optim.make_optimizer(make_config())
    config = make_config()
    config.train.grad_accum_steps = 2
    multi = optim.make_optimizer(config)
    s_multi = multi.init(params)
    update = jax.jit(multi.update)
    u1, s_multi = update(g1, s_multi, params)
    u2, s_multi = update(g2, s_multi, params)
    expected, _ = accumulated.update(
        jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), accumulated.init(params), params
    )
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_adamw_decay_uses_reference_convention():
    params = fake_params()
    config = make_config(name="adamw", warmup_steps=4)
    tx = optim.make_optimizer(config)
    zeros = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    factor = 0.25 * config.optim.weight_decay  # lr_t / peak_lr * wd at the first of 4 warm-up steps
    np.testing.assert_allclose(
        updates["adapter"]["kernel"], -factor * params["adapter"]["kernel"], rtol=1e-6
    )
    assert np.all(np.asarray(updates["ln_f"]["scale"]) == 0)
    assert np.all(np.asarray(updates["prelude_0"]["attn"]["qk_bias"]) == 0)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(schedule="warmup_constant", warmup_steps=4), {0: 0.25, 2: 0.75, 3: 1.0, 99: 1.0}),
        (dict(schedule="warmup_constant", warmup_steps=0), {0: 1.0, 50: 1.0}),
        (
            dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1),
            {0: 0.1, 9: 1.0, 79: 1.0, 89: 0.1 + 0.9 * 0.5, 99: 0.1},
        ),
        (
            dict(schedule="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape="1-sqrt"),
            {79: 1.0, 89: 1 - np.sqrt(0.5), 99: 0.0},
        ),
        (
            dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1),
            {4: 0.5, 9: 1.0, 54: 0.1 + 0.9 * 0.5, 99: 0.1, 200: 0.1},
        ),
    ],
)
def test_schedules(overrides, expected):
    schedule = optim.make_schedule(make_config(lr=1.0, **overrides))
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(jnp.int32(step))), value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="sgd"), r"optim.name='sgd' is not supported; use one of adam_atan2, adamw\.$"),
        (dict(schedule="linear"), "config.optim.schedule='linear' is not supported; use one of"),
        (dict(schedule="wsd", decay_shape="cos"), "config.optim.decay_shape='cos'"),
    ],
)
def test_unknown_names(overrides, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(make_config(**overrides))


def test_weight_decay_mask_on_the_model():
    from rdlm.model import ModelConfig, RecurrentLM

    config = ModelConfig.preset("tiny")
    abstract = jax.eval_shape(
        lambda: RecurrentLM(config).init({"params": jax.random.key(0)}, jnp.ones((1, 4), jnp.int32), num_steps=1, init_scale=0.0)
    )["params"]
    mask = optim.weight_decay_mask(abstract)
    assert mask["wte"]["embedding"].value and mask["core"]["adapter"].value
    layers = mask["core"]["core_block"]["layers"]
    assert all(layers["attn"][k].value for k in ("wqkv", "wo")) and all(layers["mlp"][k].value for k in ("fc", "proj"))
    assert not layers["attn"]["qk_bias"].value and not layers["norm_1"]["scale"].value
    assert not mask["ln_f"]["scale"].value


def test_update_clipping_is_per_layer_for_stacked_params():
    """A spike in layer 0 of a stacked [L, ...] tensor clips layer 0 only, like separate tensors."""
    tx = optim.scale_by_adam_atan2(B1, B2, update_clipping=True, running_init=True)
    rng = np.random.default_rng(0)
    g1 = rng.normal(size=(2, 5)).astype(np.float32)
    g2 = rng.normal(size=(2, 5)).astype(np.float32)
    g2[0] *= 100.0
    stacked = {"layers": {"w": jnp.asarray(g1)}}
    state = tx.init(stacked)
    _, state = tx.update(stacked, state)
    stacked_update, _ = tx.update({"layers": {"w": jnp.asarray(g2)}}, state)
    for layer in range(2):
        single = {"w": jnp.asarray(g1[layer])}
        s = tx.init(single)
        _, s = tx.update(single, s)
        alone, _ = tx.update({"w": jnp.asarray(g2[layer])}, s)
        np.testing.assert_allclose(stacked_update["layers"]["w"][layer], alone["w"], rtol=1e-6)


def test_frozen_params_stay_bit_identical_and_the_rest_train_as_alone():
    """optim.freeze: frozen leaves get exact zero updates; the trained ones follow the optimizer run on them alone
    (the gradient clip and the moments see only the trained parameters)."""
    params = jax.tree.map(jnp.asarray, fake_params())
    freeze = r"^prelude_0/attn/,^wte/"
    tx = optim.make_optimizer(make_config(freeze=freeze))
    labels = optim.freeze_labels(params, freeze)
    assert labels["wte"]["embedding"] == labels["prelude_0"]["attn"]["qk_bias"] == "frozen"
    assert labels["prelude_0"]["norm_1"]["scale"] == labels["adapter"]["kernel"] == "trained"
    trained = {"prelude_0": {"norm_1": params["prelude_0"]["norm_1"]}, "adapter": params["adapter"], "ln_f": params["ln_f"]}
    alone = optim.make_optimizer(make_config())
    state, alone_state, p, q = tx.init(params), alone.init(trained), params, trained
    update, update_alone = jax.jit(tx.update), jax.jit(alone.update)
    for step in range(4):
        grads = jax.tree.map(jnp.asarray, fake_grads(fake_params(), step))
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        sub = {"prelude_0": {"norm_1": grads["prelude_0"]["norm_1"]}, "adapter": grads["adapter"], "ln_f": grads["ln_f"]}
        sub_updates, alone_state = update_alone(sub, alone_state, q)
        q = optax.apply_updates(q, sub_updates)
    for path in (("wte", "embedding"), ("prelude_0", "attn", "qk_bias"), ("prelude_0", "attn", "qkv", "kernel")):
        after, before = p, params
        for key in path:
            after, before = after[key], before[key]
        assert np.asarray(after).tobytes() == np.asarray(before).tobytes(), path  # bit-identical
    assert not np.array_equal(p["adapter"]["kernel"], params["adapter"]["kernel"])
    np.testing.assert_allclose(p["adapter"]["kernel"], q["adapter"]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p["prelude_0"]["norm_1"]["scale"], q["prelude_0"]["norm_1"]["scale"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("freeze, message", [
    ("nothing_here", r"optim.freeze: 'nothing_here' matches no parameter; use prelude, core, coda, embedding or a regex"),
    ("(", r"optim.freeze: '\(' is not a valid regular expression"),
    (".", r"optim.freeze='.' freezes every parameter; leave some to train."),
])
def test_freeze_errors_are_one_sentence(freeze, message):
    with pytest.raises(ValueError, match=message):
        optim.freeze_labels(fake_params(), freeze)
