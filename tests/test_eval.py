"""Evaluation: lm-eval's scoring rules on known answers, task files and their errors, the engine against the
model itself, and the checkpoint EMA against a hand-computed average."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rdlm import checkpoint_io, ema, orbax_steps
from rdlm.eval import scoring, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- multiple choice ---------------------------------------------------------------------------------

def test_acc_and_acc_norm_on_hand_made_loglikelihoods():
    # The summed log-likelihood favours the short choice; per character (-1/1 against -5/10) the long one wins.
    choices = ["a", "bbbbbbbbbb"]
    assert scoring.choice_scores([-1.0, -5.0], choices, label=0) == {"acc": 1.0, "acc_norm": 0.0}
    assert scoring.choice_scores([-1.0, -5.0], choices, label=1) == {"acc": 0.0, "acc_norm": 1.0}
    # -2/1 = -2 against -15/10 = -1.5: acc picks the first, acc_norm the second.
    assert scoring.choice_scores([-2.0, -15.0], ["x", "yyyyyyyyyy"], label=1) == {"acc": 0.0, "acc_norm": 1.0}
    assert scoring.choice_scores([-1.0, -3.0, -0.5], ["no", "maybe", "yes"], label=2) == {"acc": 1.0, "acc_norm": 1.0}
    # A tie goes to the first choice, as np.argmax does in lm-eval.
    assert scoring.choice_scores([-1.0, -1.0], ["p", "q"], label=0)["acc"] == 1.0


def test_choice_requests_use_the_target_delimiter():
    task = tasks.Task("t", tasks.MULTIPLE_CHOICE, "x.jsonl", (tasks.ChoiceDoc("Q:", ("yes", "no"), 0),))
    assert task.choice_requests() == [("Q:", " yes"), ("Q:", " no")]


# --- GSM8K -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("generated, reference, strict, flexible", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "She sold 48+24 = 72 clips. #### 72", 1.0, 1.0),
    ("#### 1,000", "#### 1000", 1.0, 1.0),  # commas are ignored on both sides
    ("It costs $18. #### $18", "#### 18", 0.0, 1.0),  # strict needs a digit after '#### '; flexible drops '$'
    ("The answer is 42.", "#### 42", 0.0, 1.0),  # gsm8k's strict pattern needs '#### '
    ("First 3 apples, then 5.", "#### 5", 0.0, 1.0),  # flexible takes the last number ("5." loses its '.')
    ("I do not know.", "#### 7", 0.0, 0.0),  # no number at all: both are [invalid]
    ("#### 7\nThen 8 more: 15", "#### 7", 1.0, 0.0),  # strict takes the first '####', flexible the last number
    ("#### -3", "#### -3", 1.0, 1.0),
])
def test_gsm8k_strict_and_flexible(generated, reference, strict, flexible):
    assert scoring.generation_scores(generated, reference) == {"strict-match": strict, "flexible-extract": flexible}


def test_gsm8k_cot_strict_pattern():
    cot = scoring.STRICT_PATTERNS["gsm8k_cot"]
    assert scoring.generation_scores("So 6 + 6 = 12. The answer is 12.", "12", cot)["strict-match"] == 1.0
    assert scoring.generation_scores("The answer is $1,234.", "1234", cot)["strict-match"] == 0.0  # '$' is no digit
    assert scoring.generation_scores("The answer is 1,234.", "1234", cot)["strict-match"] == 1.0
    assert scoring.extract("no number", cot) == scoring.FALLBACK


def test_generation_context_renders_fewshot_like_lm_eval():
    shot = tasks.GenerationDoc("1+1?", "2")
    task = tasks.Task("t", tasks.GENERATION, "x.jsonl", (tasks.GenerationDoc("2+2?", "4"),), fewshot=(shot, shot))
    assert task.generation_context(task.docs[0]) == (
        "Question: 1+1?\nAnswer: 2\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:")


# --- task files --------------------------------------------------------------------------------------

def _jsonl(path, *records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("record, message", [
    ({"context": "a", "label": 0}, ":2: the record has no 'choices' field"),
    ({"context": "a", "choices": ["x", "y"], "label": 2}, ":2: 'label' 2 must be an index into the 2 choices"),
    ({"context": "a", "choices": [], "label": 0}, ":2: 'choices' must be a non-empty list"),
    ("{not json", ":2: the line is not valid JSON"),
])
def test_bad_choice_records_name_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "mc.jsonl", {"context": "q", "choices": ["a", "b"], "label": 1}, record)
    with pytest.raises(ValueError) as e:
        tasks.load(path)
    assert str(e.value).startswith(f"Task file {path}{message}")


def test_bad_generation_record_and_unknown_task(tmp_path):
    path = _jsonl(tmp_path / "gen.jsonl", {"question": "q", "answer": "#### 1"}, {"question": "q2"})
    with pytest.raises(ValueError, match=r"gen.jsonl:2: the record has no 'answer' field"):
        tasks.load(path)
    with pytest.raises(ValueError, match=r"Unknown task 'nope'.*parity-choice"):
        tasks.load("nope")


def test_shipped_tasks_come_from_the_builtin_problems():
    from rdlm.eval import make_tasks

    assert {"parity-choice", "parity-answer"} <= set(tasks.shipped_names())
    choice, answer = tasks.load("parity-choice"), tasks.load("parity-answer")
    problems = make_tasks.problems("parity", len(choice.docs), range(1, 33))
    assert [(d.context, d.choices[d.label]) for d in choice.docs] == [(p.prompt, p.answer) for p in problems]
    assert [(d.question, d.answer) for d in answer.docs] == [(p.prompt, p.answer) for p in problems]


def test_evaluate_cli_bad_input_is_one_sentence(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for args, message in [
        ([f"--checkpoint={tmp_path / 'missing'}"], f"error: Checkpoint path {tmp_path / 'missing'} does not exist."),
        (["--tasks=nope", "--write_lm_eval_tasks=" + str(tmp_path / "y")], "error: Unknown task 'nope'"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "rdlm.evaluate", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
        assert "Traceback" not in proc.stderr


# --- the engine against the model --------------------------------------------------------------------

def _direct_loglikelihoods(model, engine, pairs, r):
    """Each continuation's summed token log-probabilities from one plain forward pass of the model."""
    from rdlm.model import RecurrentLM

    encoded = [engine.encode_pair(*p) for p in pairs]
    length = max(len(c) + len(x) for c, x in encoded)
    ids = np.zeros((len(pairs), length), np.int32)
    for row, (c, x) in enumerate(encoded):
        ids[row, :len(c) + len(x)] = c + x  # right padding: causal attention keeps it out of the real tokens
    apply = jax.jit(lambda p, i, n: RecurrentLM(model.config).apply({"params": p}, i, num_steps=n, init_scale=0.0))
    logp = jax.nn.log_softmax(apply(jax.device_get(model.params), jnp.asarray(ids[:, :-1]), jnp.int32(r)).logits)
    return [sum(float(logp[row, len(c) - 1 + j, t]) for j, t in enumerate(x)) for row, (c, x) in enumerate(encoded)]


PAIRS = [("def fibonacci(n):", " return n"), ("The answer is", " 42."), ("Question: What is", " 17")]


def test_engine_loglikelihood_is_the_models_summed_log_probs(hf_with_tokenizer):
    from rdlm.eval import engine as engine_lib, runner

    model = runner.load_model(str(hf_with_tokenizer))
    engine = model.engine(batch_size=4, init_scale=0.0, max_steps=4)
    programs = []
    for r in (2, 4):
        scored = engine.loglikelihood(PAIRS, r)
        programs.append(engine_lib._forward_scores._cache_size())
        np.testing.assert_allclose(scored.loglikelihood, _direct_loglikelihoods(model, engine, PAIRS, r), rtol=1e-5)
    assert programs[0] == programs[1]  # the second r reuses the first one's program (one bucket)


@pytest.mark.slow
def test_cached_scoring_equals_the_forward_pass(hf_with_tokenizer):
    from rdlm.eval import decoding, runner

    engine = runner.load_model(str(hf_with_tokenizer)).engine(batch_size=4, init_scale=0.0, max_steps=4)
    rows = [(c + x, len(x), 0) for c, x in (engine.encode_pair(*p) for p in PAIRS)]
    programs = []
    for r in (2, 4):
        cached = engine._cached_scores(rows, r, None)
        programs.append(decoding.run._cache_size())
        np.testing.assert_allclose(cached.loglikelihood, engine.loglikelihood(PAIRS, r).loglikelihood, rtol=1e-5)
        assert cached.steps == [[r] * (len(whole) - 1) for whole, _, _ in rows]
    assert programs[0] == programs[1]  # one cached program for both r


def test_scoring_through_an_exit_that_never_fires_equals_the_forward_pass(hf_with_tokenizer):
    """The adaptive-exit path (every token one at a time through the exit) with a KL threshold no step can
    reach runs the full r and scores what one forward pass scores."""
    from rdlm.eval import runner
    from rdlm.sampling.exits import ExitCriterion

    engine = runner.load_model(str(hf_with_tokenizer)).engine(batch_size=4, init_scale=0.0, max_steps=3)
    scored = engine.loglikelihood(PAIRS[:2], 3, exit=ExitCriterion("kl", 0.0))
    np.testing.assert_allclose(scored.loglikelihood, engine.loglikelihood(PAIRS[:2], 3).loglikelihood, rtol=1e-5)
    assert all(set(steps) == {3} for steps in scored.steps)


# --- EMA ---------------------------------------------------------------------------------------------

def _save_step(root, step, params):
    from rdlm.model import ModelConfig

    config = orbax_steps.model_config_to_json(ModelConfig(vocab_size=8, n_embd=4, n_heads=1, intermediate_size=8))
    orbax_steps.checkpointer().save(root / "checkpoints" / str(step), ocp.args.Composite(
        params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(config),
        config=ocp.args.JsonSave({"step": step})))


def test_ema_of_three_known_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    thetas = {s: {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": {"c": rng.normal(size=(5,)).astype(np.float32)}}
              for s in (10, 20, 30, 40, 50)}
    for step, params in thetas.items():
        _save_step(tmp_path / "run", step, params)
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"spm")

    chosen = ema.average(tmp_path / "run", tmp_path / "ema", beta=0.9, last=3, dilation=1)
    assert chosen.steps == (30, 40, 50)
    np.testing.assert_allclose(chosen.weights, [0.81, 0.09, 0.1])
    _, params = checkpoint_io.load_params(tmp_path / "ema", as_numpy=True)
    for key in ("a",):
        hand = 0.81 * thetas[30][key] + 0.09 * thetas[40][key] + 0.1 * thetas[50][key]
        np.testing.assert_allclose(params[key], hand, rtol=1e-6)
    np.testing.assert_allclose(params["b"]["c"], 0.81 * thetas[30]["b"]["c"] + 0.09 * thetas[40]["b"]["c"]
                               + 0.1 * thetas[50]["b"]["c"], rtol=1e-6)
    assert params["a"].dtype == np.float32
    assert (tmp_path / "ema" / "tokenizer.model").read_bytes() == b"spm"
    assert checkpoint_io.read_run_config(tmp_path / "ema") == {"step": 50}

    # Dilation keeps the newest and every d-th before it, inside the window of the newest `last`.
    assert ema.plan([10, 20, 30, 40, 50], beta=0.5, last=5, dilation=2).steps == (10, 30, 50)
    assert ema.plan([10, 20, 30, 40, 50], beta=0.5, last=4, dilation=2).steps == (30, 50)
    with pytest.raises(FileExistsError):
        ema.average(tmp_path / "run", tmp_path / "ema")
