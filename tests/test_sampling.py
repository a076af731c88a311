"""KV-cached sampling: parity with the reference's greedy outputs, full recomputation, compiled-code reuse,
input errors, token filters and the CLI (batches and stops: test_sampling_adaptive.py)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import huginn_tokenizer
from rdlm import checkpoint_io, cli, generate as generate_cli, orbax_steps
from rdlm.interop import huginn, safetensors_io
from rdlm.model import RecurrentLM
from rdlm.sampling import KVCache, SamplerOptions, decode, generate, logits, precision, text

NEW = 12


@pytest.fixture(scope="module")
def tiny(huginn_tiny_dir):
    config, params = huginn.load_hf_checkpoint(huginn_tiny_dir / "checkpoint")
    expected = safetensors_io.SafetensorsFile(huginn_tiny_dir / "expected.safetensors")
    return config, params, {k: np.asarray(expected.get(k)) for k in expected.keys()}


def greedy(config, params, prompts, r, **kwargs):
    return generate(config, params, prompts, max_new_tokens=NEW, num_steps=r, init_scale=0.0, **kwargs)


@pytest.mark.parametrize("r", [2, 8])
def test_greedy_reproduces_reference(tiny, r):
    config, params, exp = tiny
    out = greedy(config, params, exp["input_ids"][:1, :8], r)
    np.testing.assert_array_equal(out.tokens, exp[f"greedy_r{r}"])
    np.testing.assert_array_equal(out.steps_per_token, np.full((1, NEW), r))


@pytest.mark.parametrize("window", [None, 3])
def test_cached_decoding_equals_full_recomputation(tiny, window):
    config, params, exp = tiny
    cfg = config.replace(attention_window=window)
    tokens = np.asarray(greedy(cfg, params, exp["input_ids"][:1, :8], 2).tokens)
    forward = jax.jit(lambda p, x: RecurrentLM(cfg).apply({"params": p}, x, num_steps=2, init_scale=0.0).logits)
    np.testing.assert_array_equal(np.argmax(forward(params, tokens), axis=-1)[0, 7:-1], tokens[0, 8:])
    if window is not None:  # the window changes what the model sees
        assert not np.array_equal(tokens, exp["greedy_r2"])


def test_second_call_does_not_recompile(tiny):
    config, params, exp = tiny
    greedy(config, params, exp["input_ids"][:1, :8], 2)
    sampler = decode.cached_sampler(config, SamplerOptions(num_steps=2, init_scale=0.0))
    before = (sampler.decode._cache_size(), decode.prefill._cache_size())
    other = greedy(config, params, exp["input_ids"][1:2, 3:11], 2, stop_tokens=[7, 9])
    assert (sampler.decode._cache_size(), decode.prefill._cache_size()) == before
    assert np.asarray(other.tokens).shape == (1, 8 + NEW)
    greedy(config, params, exp["input_ids"][:1, :8], 8, exit_criterion="kl", exit_threshold=0.1, check_every=2)
    kl = decode.cached_sampler(config, SamplerOptions.build(num_steps=8, init_scale=0.0, exit_criterion="kl").static())
    assert kl.decode._cache_size() == 1
    prefills = decode.prefill._cache_size()  # the prompt exits by the same criterion, with the same knobs
    greedy(config, params, exp["input_ids"][1:2, 3:11], 8, exit_criterion="kl", exit_threshold=0.01, check_every=1,
           min_steps=1)  # threshold, check_every and min_steps are knobs: the same program
    assert (kl.decode._cache_size(), decode.prefill._cache_size()) == (1, prefills)
    # without an exit, exit_in_prefill changes nothing and so compiles nothing new
    assert SamplerOptions(num_steps=2, exit_in_prefill=False).static() == SamplerOptions(num_steps=2).static()


def _program_size(config, params, prompt, options: SamplerOptions) -> int:
    """Lines of the decode loop's StableHLO for these options (the program XLA compiles)."""
    sampler = decode.Sampler(config, options)
    knobs = options.knobs()
    ids, lengths = np.asarray(prompt, np.int32)[None], np.asarray([len(prompt)], np.int32)
    state = jax.eval_shape(lambda: sampler.prefill(params, knobs, ids, lengths, jax.random.key(0), max_new_tokens=4))
    return len(sampler.decode.lower(params, knobs, state).as_text().splitlines())  # traced, not compiled


@pytest.mark.parametrize("exit_criterion", [None, "kl", "latent-diff"])
def test_the_compiled_program_does_not_grow_with_num_steps(tiny, exit_criterion):
    """The iterations run in a while loop: the program for r = 32 is the one for r = 4, so compile time and
    memory do not depend on r."""
    config, params, exp = tiny
    prompt = exp["input_ids"][0, :8]
    sizes = {r: _program_size(config, params, prompt, SamplerOptions.build(num_steps=r, init_scale=0.0,
                                                                         exit_criterion=exit_criterion))
             for r in (4, 32)}
    assert sizes[4] == sizes[32], sizes


def test_bfloat16_inference_agrees_with_float32(tiny):
    """Weights and activations in bf16: logits within 2.5% of the reference's float32 ones and the same argmax at
    (nearly) every position; the bf16 cache (stored as uint16 bits) reads back what was written."""
    config, params, exp = tiny
    bf_config, bf_params = precision.with_dtype(config, params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(bf_params)} == {jnp.dtype(jnp.bfloat16)}
    forward = jax.jit(lambda p, x: RecurrentLM(bf_config).apply({"params": p}, x, num_steps=4, init_scale=0.0).logits)
    logits = forward(bf_params, exp["input_ids"])
    reference = exp["logits_zero_init_r4"]
    error = np.abs(np.asarray(logits) - reference).max()
    assert 1e-3 < error < 0.025 * np.abs(reference).max(), error  # bf16 for real, and close
    assert np.mean(np.argmax(logits, axis=-1) == np.argmax(reference, axis=-1)) >= 0.9
    cache = KVCache.create(bf_config, 2, 8, 3)
    L, H, K = config.n_layers_in_recurrent_block, config.n_heads, config.head_dim
    kv = tuple(jnp.asarray(np.random.default_rng(i).normal(size=(L, 2, 1, H, K)), jnp.bfloat16) for i in (0, 1))
    cache = cache.write_core(1, kv, jnp.asarray([[2], [5]]))
    keys, values = cache.core_slot(1)
    assert keys[0].dtype == jnp.bfloat16 and cache.core[0].dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(keys[0][0, :, :, 2], np.float32), np.asarray(kv[0][0, 0, 0], np.float32))
    np.testing.assert_array_equal(np.asarray(values[0][1, :, 5], np.float32), np.asarray(kv[1][0, 1, 0], np.float32))
    with pytest.raises(ValueError, match="dtype='float16' is not one of float32, bfloat16"):
        precision.with_dtype(config, params, "float16")


@pytest.mark.slow
def test_bfloat16_greedy_equals_float32_greedy_on_the_fixture(tiny):
    config, params, exp = tiny
    out = greedy(*precision.with_dtype(config, params, "bfloat16"), exp["input_ids"][:1, :8], 8)
    np.testing.assert_array_equal(out.tokens, exp["greedy_r8"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_ids=[[]]), "Prompt 0 is empty"),
        (dict(prompt_ids=np.zeros((1, 0), np.int32)), "Prompt 0 is empty"),
        (dict(prompt_ids=[list(range(129))]), "Prompt length 129 exceeds the positions table (block_size=128)"),
        (dict(max_new_tokens=121), "max_new_tokens=121 after a 8-token prompt overflows block_size=128"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be an int >= 1"),
        (dict(exit_criterion="bogus"), "Unknown exit_criterion 'bogus'"),
        (dict(exit_criterion="kl", exit_threshold="5e-4"), "exit_threshold='5e-4' for 'kl' must be a finite"),
        (dict(exit_criterion="argmax-stability", exit_threshold=2.5), "exit_threshold=2.5 for 'argmax-stability'"),
        (dict(exit_threshold=0.1), "exit_threshold=0.1 was given without an exit_criterion"),
        (dict(prompt_ids=[[3, 600]]), "Prompt token ids must lie in [0, 512)"),
        (dict(kv_share=0), "kv_share=0 must be an int >= 1"),
        (dict(min_steps=9), "min_steps=9 exceeds num_steps=8"),
        (dict(stop_tokens=[1000]), "stop token 1000 is outside the model's vocabulary"),
        (dict(num_steps=0), "num_steps=0 must be an int >= 1"),
        (dict(prompt_ids=np.zeros((2, 4), np.int32), prompt_lengths=[2, 5]), "prompt_lengths [2, 5] must lie in"),
    ],
)
def test_bad_input_gets_one_clear_error(tiny, kwargs, message):
    config, params, exp = tiny
    args = dict(prompt_ids=exp["input_ids"][:1, :8], max_new_tokens=4, num_steps=8, init_scale=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError) as error:
        generate(config, params, args.pop("prompt_ids"), **args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_token_filters():
    logits_BV = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    filtered = jax.jit(logits.filtered_logits, static_argnums=(1, 2, 3, 4))

    def kept(top_k, top_p, min_p):
        return np.flatnonzero(np.asarray(filtered(logits_BV, 1.0, top_k, top_p, min_p))[0] > -1e29).tolist()

    assert kept(top_k=2, top_p=None, min_p=None) == [0, 1]
    assert kept(top_k=None, top_p=0.7, min_p=None) == [0, 1]
    assert kept(top_k=None, top_p=0.8, min_p=None) == [0, 1, 2]
    assert kept(top_k=None, top_p=None, min_p=0.29) == [0, 1, 2]
    assert kept(top_k=None, top_p=None, min_p=0.4) == [0, 1]
    choose = jax.jit(logits.choose, static_argnums=(2, 3))
    draws = choose(jax.random.key(1), jnp.repeat(logits_BV, 400, axis=0), 1.0, 3)
    assert set(np.asarray(draws).tolist()) == {0, 1, 2}


def test_cli_generates_from_an_hf_directory(tiny, huginn_tiny_dir, tmp_path):
    config, params, exp = tiny
    hf = tmp_path / "hf"
    shutil.copytree(huginn_tiny_dir / "checkpoint", hf)
    huginn_tokenizer.write(hf / "tokenizer.json")
    codec = text.load_codec(hf)
    assert codec.stop_ids == (500, 501, 504) and codec.pad_id == 505 and codec.bos_id == 500
    chat = [500, 502, 506, 503, 7, 8, 504, 502, 506, 503]  # "user" and "Huginn" are unknown words here
    assert codec.prompt_ids("w7 w8", chat=True) == chat
    ids = [int(i) for i in exp["input_ids"][1] if i < 500][:7]
    words = " ".join(f"w{i}" for i in ids)
    assert codec.prompt_ids(words) == [500] + ids
    g = generate_cli.generate_text(str(hf), words, num_steps=2, max_new_tokens=NEW, init_scale=0.0)
    expected = greedy(config, params, [[500] + ids], 2, stop_tokens=codec.stop_ids, pad_id=505).new_tokens()[0]
    assert g.new_ids == expected and g.steps_per_token == [2] * len(expected)
    assert g.text == codec.decode(expected)


@pytest.mark.parametrize("flag, kwargs", [("--check_every", {"check_every": 2}),
                                          ("--noexit_in_prefill", {"exit_in_prefill": False})])
def test_cli_exit_settings_without_an_exit_are_refused(huginn_tiny_dir, flag, kwargs):
    """Settings of the exit criterion without --exit would change nothing: refused before anything is loaded."""
    with pytest.raises(ValueError, match=f"^{flag} needs an --exit criterion.$"):
        generate_cli.generate_text(str(huginn_tiny_dir / "checkpoint"), "x", num_steps=2, **kwargs)


def test_tokenizer_is_found_for_workdirs_and_step_dirs(tiny, tmp_path):
    from rdlm.data.tokenizer import train_tokenizer

    config, params, _ = tiny
    workdir = tmp_path / "run"
    orbax_steps.save_params(workdir / orbax_steps.CHECKPOINTS_SUBDIR / "5", config, params)
    corpus = [f"def f{i}(x):\n    return x * {i}\n" for i in range(300)]
    train_tokenizer(corpus, vocab_size=300).save(workdir / "tokenizer.model")
    for directory in (workdir, workdir / orbax_steps.CHECKPOINTS_SUBDIR / "5"):
        assert text.tokenizer_path(directory) == workdir / "tokenizer.model"
        codec = text.load_codec(directory)
        assert codec.prompt_ids("return x")[0] == codec.bos_id == 1 and codec.stop_ids == (2, 6)  # </s>, <|end_turn|>
        assert codec.decode(codec.prompt_ids("return x")[1:]) == "return x"
    chat = codec.prompt_ids("hi", chat=True)  # rdlm's SentencePiece models have huginn's chat tokens (ids 4-6)
    assert chat[:2] == [1, 4] and chat.count(5) == 2 and chat.count(6) == 1 and codec.decode(chat) == "user\n\nhiHuginn\n\n"
    import io

    import sentencepiece as spm

    plain = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=plain, vocab_size=60, minloglevel=2)
    (workdir / "tokenizer.model").write_bytes(plain.getvalue())
    with pytest.raises(ValueError, match="--chat needs a tokenizer with huginn's chat tokens: The tokenizer .* has no"):
        text.load_codec(workdir).prompt_ids("hi", chat=True)
    loaded, _ = checkpoint_io.load_params(workdir)
    assert loaded == config


def test_cli_reports_bad_input_in_one_line(huginn_tiny_dir, capsys):
    argv = ["rdlm.generate", f"--checkpoint={huginn_tiny_dir / 'checkpoint'}", "--prompt=x", "--exit=bogus:1"]
    generate_cli.FLAGS(argv)
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.expected_failures(generate_cli.main)(argv[:1])  # what cli.run wraps main in
    finally:
        generate_cli.FLAGS.unparse_flags()
    assert exit_.value.code == cli.USAGE_ERROR
    assert capsys.readouterr().err == (
        "error: Unknown exit_criterion 'bogus'; choose one of ('kl', 'minp-kl', 'entropy-diff', "
        "'latent-diff', 'cosine', 'argmax-stability') or None.\n"
    )
