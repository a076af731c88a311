"""The lm-eval model `rdlm`: lm-eval's own CLI and simple_evaluate, offline, on task YAMLs over local JSONL,
give rdlm.evaluate's numbers; log-likelihoods are the model's; huginn's chat template."""

import glob
import json
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdlm.eval import runner, tasks

pytestmark = pytest.mark.slow  # lm-eval, a trained run and several compiles: minutes on 2 cores
REPO = pathlib.Path(__file__).resolve().parents[1]
# Offline, and any attempt at the network fails at once.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    env = {**OFFLINE, "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def yaml_dir(eval_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for spec in eval_run[2].values():
        task = tasks.load(str(spec))
        (out / f"{task.name}.yaml").write_text(tasks.lm_eval_yaml(task))
    return out


EXIT = "kl:1e-3"  # the adapter's model_args exit, through the token-by-token path


@pytest.fixture(scope="module")
def rdlm_scores(eval_run):
    """rdlm.evaluate's scores of the small tasks at r = 4 with the exit."""
    workdir, _, specs = eval_run
    model = runner.load_model(str(workdir))
    result = runner.evaluate(model, num_steps=(4,), tasks=[str(s) for s in specs.values()], batch_size=8, exit=EXIT)
    choice, answer = result["tasks"]["small-parity-choice"], result["tasks"]["small-parity-answer"]
    return {"acc": choice["acc"][0], "acc_norm": choice["acc_norm"][0],
            "strict": answer["strict-match"][0], "flexible": answer["flexible-extract"][0]}


def _lm_eval_scores(results: dict) -> dict:
    choice, answer = results["small-parity-choice"], results["small-parity-answer"]
    return {"acc": choice["acc,none"], "acc_norm": choice["acc_norm,none"],
            "strict": answer["exact_match,strict-match"], "flexible": answer["exact_match,flexible-extract"]}


def test_lm_eval_cli_gives_rdlm_evaluates_numbers(eval_run, rdlm_scores, yaml_dir, offline, tmp_path):
    workdir = eval_run[0]
    out = tmp_path / "out"
    env = {**os.environ, **offline, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [shutil.which("rdlm-lm-eval") or str(pathlib.Path(os.sys.executable).parent / "rdlm-lm-eval"), "run",
         "--model", "rdlm", "--model_args", f"checkpoint={workdir},num_steps=4,exit={EXIT}", "--batch_size", "8",
         "--include_path", str(yaml_dir), "--tasks", "small-parity-choice", "small-parity-answer",
         "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [path] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(pathlib.Path(path).read_text())["results"]
    assert _lm_eval_scores(results) == rdlm_scores


def test_simple_evaluate_gives_rdlm_evaluates_numbers(eval_run, rdlm_scores, yaml_dir, offline):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rdlm.eval import harness

    assert "rdlm" in harness.register() or "rdlm" in lm_eval.api.registry.model_registry
    workdir = eval_run[0]
    out = lm_eval.simple_evaluate(
        model="rdlm", model_args={"checkpoint": str(workdir), "num_steps": 4, "exit": EXIT}, batch_size=8,
        tasks=["small-parity-choice", "small-parity-answer"], task_manager=TaskManager(include_path=str(yaml_dir)))
    assert _lm_eval_scores(out["results"]) == rdlm_scores


def test_loglikelihood_is_the_summed_token_log_probs_and_chat_template(hf_with_tokenizer, offline):
    from lm_eval.api.instance import Instance

    from rdlm.eval.harness import RdlmLM
    from rdlm.model import RecurrentLM

    lm = RdlmLM(checkpoint=str(hf_with_tokenizer), num_steps=3, init_scale=0.0, batch_size=4)
    pairs = [("def fibonacci(n):", " return n"), ("The answer is ", "42.")]  # the trailing space moves over
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs])
    params = jax.device_get(lm.model.params)
    for (context, continuation), (ll, _) in zip(pairs, got):
        tok = lm.codec.encode_fn
        ctx = [lm.prefix_token_id] + tok(context.rstrip(" "))
        whole = [lm.prefix_token_id] + tok(context + continuation)
        cont = whole[len(ctx):]
        out = RecurrentLM(lm.model.config).apply({"params": params}, jnp.asarray([whole[:-1]]), num_steps=3,
                                                 init_scale=0.0)
        logp = jax.nn.log_softmax(out.logits[0].astype(jnp.float32))
        assert ll == pytest.approx(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), rel=1e-5)

    chat = lm.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}])
    assert chat == ("<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\nHi<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n")
    ids = lm.tok_encode(chat)
    assert ids[0] == lm.prefix_token_id and ids[1] != lm.prefix_token_id  # one BOS, the template's own
    assert set(lm.codec.stop_ids) >= {lm.codec.encode_fn("<|end_turn|>")[0], lm.codec.encode_fn("<|end_text|>")[0]}


def test_apply_chat_template_through_simple_evaluate(hf_with_tokenizer, offline, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rdlm.eval import engine as engine_lib
    from rdlm.eval.harness import RdlmLM

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in
                            [("What is 2 + 2?", "#### 4"), ("What is 17 * 23?", "#### 391")]))
    task = tasks.load(str(data))
    (tmp_path / "qa.yaml").write_text(tasks.lm_eval_yaml(task).replace("max_gen_toks: 256", "max_gen_toks: 8"))
    lm = RdlmLM(checkpoint=str(hf_with_tokenizer), num_steps=2, batch_size=2)
    out = lm_eval.simple_evaluate(model=lm, tasks=["qa"], apply_chat_template=True, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    samples = out["samples"]["qa"]
    contexts = [s["arguments"][0][0] for s in samples]
    assert all(c.startswith("<|begin_text|><|begin_header|>user<|end_header|>\n\nQuestion: ") for c in contexts)
    assert all(c.endswith("<|end_turn|><|begin_header|>Huginn<|end_header|>\n\n") for c in contexts)
    expected = lm.engine.generate(contexts, until=task.until, max_gen_toks=8, num_steps=2)
    assert [s["resps"][0][0] for s in samples] == expected.text
    assert isinstance(lm.engine, engine_lib.Engine) and np.isfinite(out["results"]["qa"]["exact_match,strict-match"])
