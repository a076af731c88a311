"""Batches of prompts, stop tokens, per-token adaptive exit, KV sharing and continuous chain-of-thought.

One compiled KL-exit sampler per shape serves most tests: threshold 0 never exits (plain greedy).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_sampling_reference import ReferenceDecoder
from rdlm.interop import huginn, safetensors_io
from rdlm.model import RecurrentLM
from rdlm.sampling import KVCache, SamplerOptions, decode, exits, generate
from rdlm.sampling.block import run_block

NEW, R = 12, 8


@pytest.fixture(scope="module")
def tiny(huginn_tiny_dir):
    config, params = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    expected = safetensors_io.SafetensorsFile(huginn_tiny_dir / "expected.safetensors")
    return config, params, {k: np.asarray(expected.get(k)) for k in expected.keys()}


@pytest.fixture(scope="module")
def reference(tiny):
    config, params, _ = tiny
    return ReferenceDecoder(config, params, max_len=8 + NEW)


def kl_generate(config, params, prompts, threshold, check_every=1, **kwargs):
    return generate(config, params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0, exit_criterion="kl",
                    exit_threshold=threshold, check_every=check_every, **kwargs)


def kl_run(config, params, prompts, threshold, check_every=1, **kwargs):
    """The final sampling state (cache included) of the same compiled sampler generate() uses."""
    options = SamplerOptions.build(num_steps=R, init_scale=0.0, exit_criterion="kl", exit_threshold=threshold,
                                   check_every=check_every, **kwargs)
    sampler = decode.cached_sampler(config, options.static())
    return sampler.run(params, prompts, max_new_tokens=NEW, options=options)


def test_kl_exit_extremes_and_min_steps(tiny):
    config, params, exp = tiny
    prompt = exp["input_ids"][:1, :8]
    never = kl_generate(config, params, prompt, 0.0)
    np.testing.assert_array_equal(never.tokens, exp["greedy_r8"])  # threshold 0: no token exits early
    np.testing.assert_array_equal(never.steps_per_token, R)
    np.testing.assert_array_equal(kl_generate(config, params, prompt, 1e9).steps_per_token, 1)
    np.testing.assert_array_equal(kl_generate(config, params, prompt, 1e9, min_steps=3).steps_per_token, 3)


@pytest.mark.parametrize("check_every, min_steps", [(1, 0), (3, 0), (2, 3)])
def test_kl_exit_matches_reference_decoder(tiny, reference, check_every, min_steps):
    """Exits only at checks (after iterations max(min_steps, 1) + j * check_every), as the reference."""
    config, params, exp = tiny
    prompt = exp["input_ids"][0, :8].tolist()
    out = kl_generate(config, params, [prompt], 0.01, check_every=check_every, min_steps=min_steps)
    tokens, steps = reference.generate(prompt, NEW, R, kl_threshold=0.01, check_every=check_every,
                                       min_steps=min_steps)
    np.testing.assert_array_equal(np.asarray(out.tokens)[0], tokens)
    np.testing.assert_array_equal(np.asarray(out.steps_per_token)[0], steps)
    assert 1 < np.mean(steps) < R and len(set(steps)) > 1, steps
    first = max(min_steps, 1)
    assert all((s - first) % check_every == 0 or s == R for s in steps), steps


@pytest.mark.parametrize("exit_in_prefill", [True, False])
def test_the_prompt_exits_by_the_criterion_unless_told_not_to(tiny, reference, exit_in_prefill):
    """The reference checks the criterion in the prefill too (its do_not_exit_in_prefill=False default): the
    prompt block stops at a check on its last position's distribution and its skipped KV slots repeat
    the last iteration's entries; exit_in_prefill=False runs it at full depth."""
    config, params, exp = tiny
    prompt = exp["input_ids"][0, :8].tolist()
    st = kl_run(config, params, [prompt], 0.01, exit_in_prefill=exit_in_prefill)
    tokens, steps = reference.generate(prompt, NEW, R, kl_threshold=0.01, exit_in_prefill=exit_in_prefill)
    np.testing.assert_array_equal(np.asarray(st.tokens_BN)[0], tokens)
    np.testing.assert_array_equal(np.asarray(st.steps_BM)[0], steps)
    core_k = np.asarray(st.cache.core[0])  # [C, Lc, B, H, K, T]
    repeated = [np.array_equal(core_k[R - 1, :, 0, ..., q], core_k[R - 2, :, 0, ..., q]) for q in range(7)]
    assert all(repeated) if exit_in_prefill else not any(repeated), repeated
    prompt_steps = int(np.asarray(st.prompt_steps_B)[0])
    assert prompt_steps < R if exit_in_prefill else prompt_steps == R


def test_an_exited_token_leaves_its_deepest_entry_in_skipped_slots(tiny):
    config, params, exp = tiny
    st = kl_run(config, params, exp["input_ids"][:1, :8], 0.01)
    steps = np.asarray(st.steps_BM)[0]
    core_k = np.asarray(st.cache.core[0])  # [C, Lc, B, H, K, T]
    exited = [(7 + t, int(e)) for t, e in enumerate(steps) if e < R]  # new token t: fed position 7 + t
    assert exited
    for p, e in exited:
        for j in range(e, R):
            np.testing.assert_array_equal(core_k[j, :, 0, ..., p], core_k[e - 1, :, 0, ..., p])
        if e > 1:
            assert not np.array_equal(core_k[e - 1, :, 0, ..., p], core_k[e - 2, :, 0, ..., p])


def batch_prompts(exp):
    ids = exp["input_ids"]
    return [ids[0, :8].tolist(), ids[1, :5].tolist(), ids[1, 10:13].tolist()]


def test_batch_rows_get_what_they_get_alone_and_exit_independently(tiny):
    config, params, exp = tiny
    prompts = batch_prompts(exp)
    for threshold in (0.0, 0.01):
        out = kl_generate(config, params, prompts, threshold)
        tokens, steps = np.asarray(out.tokens), np.asarray(out.steps_per_token)
        assert tokens.shape == (3, 8 + NEW)
        for b, prompt in enumerate(prompts):
            row = np.zeros((1, 8), np.int32)
            row[0, : len(prompt)] = prompt
            alone = kl_generate(config, params, row, threshold, prompt_lengths=[len(prompt)])
            n = len(prompt)
            np.testing.assert_array_equal(tokens[b, : n + NEW], np.asarray(alone.tokens)[0, : n + NEW])
            np.testing.assert_array_equal(steps[b], np.asarray(alone.steps_per_token)[0])
            np.testing.assert_array_equal(tokens[b, :n], prompt)
            assert (tokens[b, n + NEW :] == 0).all()
        if threshold == 0:
            np.testing.assert_array_equal(tokens[0], exp["greedy_r8"][0])
            np.testing.assert_array_equal(steps, R)
        else:
            assert len({tuple(row) for row in steps}) == 3  # each row exits on its own


def test_stop_tokens_end_rows(tiny):
    config, params, exp = tiny
    prompts = batch_prompts(exp)
    free = kl_generate(config, params, prompts, 0.0).new_tokens()
    stop = free[0][3]
    out = kl_generate(config, params, prompts, 0.0, stop_tokens=[stop], pad_id=7)
    tokens, steps = np.asarray(out.tokens), np.asarray(out.steps_per_token)
    ends = []
    for b, prompt in enumerate(prompts):
        n, row = len(prompt), free[b]
        end = row.index(stop) + 1 if stop in row else NEW
        ends.append(end)
        np.testing.assert_array_equal(tokens[b, n : n + end], row[:end])
        assert (tokens[b, n + end :] == 7).all() and (steps[b, end:] == 0).all() and (steps[b, :end] == R).all()
        assert out.new_tokens()[b] == row[:end]
    assert len(set(ends)) > 1 and min(ends) < NEW, ends


def test_kv_share_matches_reference_and_shrinks_the_cache(tiny, reference):
    config, params, exp = tiny
    prompt = exp["input_ids"][0, :8].tolist()
    for threshold in (0.0, 0.01):
        out = kl_generate(config, params, [prompt], threshold, kv_share=2)
        tokens, steps = reference.generate(prompt, NEW, R, share=2, kl_threshold=threshold)
        np.testing.assert_array_equal(np.asarray(out.tokens)[0], tokens)
        np.testing.assert_array_equal(np.asarray(out.steps_per_token)[0], steps)
    shared = kl_run(config, params, [prompt], 0.0, kv_share=2).cache
    full = jax.eval_shape(lambda: KVCache.create(config, 1, shared.length, R))
    assert shared.core[0].shape[0] == 2 and full.core[0].shape[0] == R
    assert sum(x.size for x in full.core) == (R // 2) * sum(x.size for x in shared.core)


def test_continuous_cot_matches_reference(tiny, reference):
    config, params, exp = tiny
    prompt = exp["input_ids"][0, :8].tolist()
    for threshold in (0.0, 0.01):
        out = kl_generate(config, params, [prompt], threshold, continuous=True)
        tokens, steps = reference.generate(prompt, NEW, R, kl_threshold=threshold, continuous=True)
        np.testing.assert_array_equal(np.asarray(out.tokens)[0], tokens)
        np.testing.assert_array_equal(np.asarray(out.steps_per_token)[0], steps)
    assert not np.array_equal(np.asarray(out.tokens)[0], reference.generate(prompt, NEW, R, kl_threshold=0.01)[0])


def _head_dots(jaxpr, vocab_size, path=()):
    """The enclosing primitives (e.g. ('while', 'cond')) of every vocabulary-wide matmul in a jaxpr."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == vocab_size:
            found.append(path)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    found += _head_dots(getattr(inner, "jaxpr", inner), vocab_size, path + (eqn.primitive.name,))
    return found


@pytest.mark.parametrize("criterion", ["kl", "argmax-stability", "latent-diff", "cosine"])
def test_a_check_runs_the_head_only_where_checked(tiny, criterion):
    """Logit criteria run the coda and head inside the iteration loop only under a cond (the check); a
    latent criterion never runs them there. Either way one more head serves after the loop."""
    config, params, _ = tiny
    options = SamplerOptions.build(num_steps=R, exit_criterion=criterion)
    cache = KVCache.create(config, 1, 16, R)

    def block_of(params, cache):
        return run_block(RecurrentLM(config), params, cache, jnp.zeros((1, 1), jnp.int32), jnp.array([3]),
                         jnp.ones((1, 1), bool), jnp.zeros((1, 1, config.n_embd)), jnp.ones((1,), bool), num_steps=R,
                         exit=options.exit, knobs=options.knobs())

    found = _head_dots(jax.make_jaxpr(block_of)(params, cache).jaxpr, config.vocab_size)
    in_loop = [path for path in found if "while" in path]
    if options.exit.uses_logits:
        assert in_loop and all(path == ("while", "cond") for path in in_loop), found
    else:
        assert not in_loop and found == [()], found


def test_criteria_values():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)
    state = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    valid = jnp.asarray([[True, True, True], [True, False, False]])
    logp = np.asarray(jax.nn.log_softmax(logits))
    p = np.exp(logp)

    @functools.partial(jax.jit, static_argnums=0)
    def first_value(name):
        criterion = exits.make_criterion(name)
        return criterion.update(criterion.init(state * 0.5, 16), logits, state, valid, criterion.threshold)[1]

    np.testing.assert_allclose(first_value("kl"), -np.log(16) - logp.mean(axis=-1), rtol=1e-5)  # KL(uniform || p)
    np.testing.assert_allclose(first_value("entropy-diff"), np.abs(-np.sum(p * logp, axis=-1) - 100.0), rtol=1e-5)
    np.testing.assert_allclose(first_value("latent-diff"), [0.5, 0.5], rtol=1e-5)  # |s - s/2| / |s|
    np.testing.assert_allclose(first_value("cosine"), [0.0, 0.0], atol=1e-6)
    assert np.asarray(first_value("argmax-stability")).tolist() == [0, 0]
    criterion = exits.make_criterion("argmax-stability", 2)
    carry = criterion.init(state, 16)
    for expected in ([0, 0], [1, 1], [2, 2]):
        carry, value, stop = criterion.update(carry, logits, state, valid, 2)
        assert np.asarray(value).tolist() == expected and np.asarray(stop).tolist() == [expected[0] >= 2] * 2
    minp = exits.make_criterion("minp-kl")
    q = np.where(p < 0.1 * p.max(-1, keepdims=True), 1 / 16, p)
    q /= q.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(minp.update(minp.init(state, 16), logits, state, valid, 0.0)[1]),
                               -np.log(16) - np.log(q).mean(axis=-1), rtol=1e-5)
    assert exits.parse_exit("kl:5e-4") == exits.ExitCriterion("kl", 5e-4)
    assert exits.parse_exit("argmax-stability") == exits.ExitCriterion("argmax-stability", 5)
    with pytest.raises(ValueError, match="threshold 'x' is not a number"):
        exits.parse_exit("kl:x")
