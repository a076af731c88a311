"""Self-speculative decoding and the parallel (diffusion-forcing) sampler."""

import numpy as np
import pytest

from test_sampling_reference import ReferenceDecoder
from rdlm.interop import huginn, safetensors_io
from rdlm.sampling import generate_parallel, generate_speculative

NEW, R = 12, 8


@pytest.fixture(scope="module")
def tiny(huginn_tiny_dir):
    config, params = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    expected = safetensors_io.SafetensorsFile(huginn_tiny_dir / "expected.safetensors")
    exp = {k: np.asarray(expected.get(k)) for k in expected.keys()}
    ids = exp["input_ids"]
    prompts = [ids[0, :8].tolist(), ids[1, :5].tolist(), ids[1, 10:13].tolist()]  # the batch of the exit tests
    return config, params, exp, prompts


@pytest.fixture(scope="module")
def reference(tiny):
    config, params, _, _ = tiny
    return ReferenceDecoder(config, params, max_len=8 + NEW)


def test_speculative_greedy_equals_plain_greedy_at_the_verifier_depth(tiny, reference):
    config, params, exp, prompts = tiny
    out = generate_speculative(config, params, prompts, max_new_tokens=NEW, num_steps=R, draft_steps=2,
                               lookahead=4, init_scale=0.0)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[0], exp["greedy_r8"][0])
    for b, prompt in enumerate(prompts):
        np.testing.assert_array_equal(tokens[b, : len(prompt) + NEW], reference.generate(prompt, NEW, R)[0])
    drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
    assert (drafted % 4 == 0).all() and (accepted <= drafted).all() and 0 < out.acceptance_rate < 1
    print(f"speculative acceptance (draft 2, verify 8, lookahead 4): {out.acceptance_rate:.3f}, "
          f"rounds {int(out.rounds)}")


def test_parallel_with_a_window_of_one_is_sequential_decoding(tiny, reference):
    """One position in flight for num_steps iterations: sequential decoding with one KV slot per token."""
    config, params, _, prompts = tiny
    out = generate_parallel(config, params, prompts, max_new_tokens=NEW, num_steps=R, inner_steps=R, window=1,
                            init_scale=0.0)
    for b, prompt in enumerate(prompts):
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, : len(prompt) + NEW],
                                      reference.generate(prompt, NEW, R, share=1)[0])
    np.testing.assert_array_equal(out.steps_per_token, R)
    assert int(out.passes) == NEW


def test_parallel_sampler_runs_every_option_within_its_bounds(tiny):
    """On this random model the latent hardly converges, so agreement is asserted on a trained one
    (test_sampling_trained.py); here: valid tokens, iterations within [inner_steps, R], fewer passes than
    sequential decoding would need."""
    config, params, exp, prompts = tiny
    fields = dict(inner_steps=2, window=None, commit="last", headway=2, ema_embeds=0.1, state_noise=0.5)
    out = generate_parallel(config, params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0, **fields)
    tokens, steps = np.asarray(out.tokens), np.asarray(out.steps_per_token)
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        new = tokens[b, n : n + NEW]
        assert new.shape == (NEW,) and ((0 <= new) & (new < config.vocab_size)).all()
    # A position whose input token changed keeps iterating past num_steps until it is fed its final token.
    assert ((2 <= steps) & (steps <= 2 * R)).all()
    assert NEW <= int(out.passes) < NEW * R // 2  # fewer passes than sequential iterations / inner_steps


@pytest.mark.parametrize("fields, message", [
    (dict(inner_steps=9), r"inner_steps=9 must be an int in \[1, num_steps=8\]"),
    (dict(window=0), "window=0 must be an int >= 1"),
    (dict(commit="first"), "commit='first' is not one of"),
    (dict(ema_embeds=1.0), r"ema_embeds=1.0 must be a float in \[0, 1\)"),
    (dict(headway=0), "headway=0 must be an int >= 1"),
])
def test_parallel_settings_are_checked(tiny, fields, message):
    config, params, _, prompts = tiny
    with pytest.raises(ValueError, match=message):
        generate_parallel(config, params, prompts, max_new_tokens=2, num_steps=R, **fields)
