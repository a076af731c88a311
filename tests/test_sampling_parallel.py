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


def test_parallel_sampler_runs_and_its_agreement_is_measured(tiny, reference):
    config, params, exp, prompts = tiny
    out = generate_parallel(config, params, prompts, max_new_tokens=NEW, num_steps=R, inner_steps=2,
                            init_scale=0.0)
    tokens, steps = np.asarray(out.tokens), np.asarray(out.steps_per_token)
    agreement = []
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        new = tokens[b, n : n + NEW]
        sequential = np.asarray(reference.generate(prompt, NEW, R)[0][n:])
        assert new.shape == (NEW,) and ((0 <= new) & (new < config.vocab_size)).all()
        agreement.append(np.mean(new == sequential))
        if steps[b, 0] == R:  # position 0 depends on nothing in flight: sequential with one KV slot
            assert new[0] == reference.generate(prompt, 1, R, share=1)[0][n]
    assert ((2 <= steps) & (steps <= R)).all()
    assert NEW <= int(out.passes) < NEW * R // 2  # fewer passes than sequential iterations / inner_steps
    print(f"parallel: {int(out.passes)} passes of 2 iterations for {NEW} tokens; "
          f"agreement {np.round(agreement, 3)}")
