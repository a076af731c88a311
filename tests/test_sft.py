"""Chat fine-tuning end to end (configs/sft.py): from a huginn HF directory, on chat shards, with a frozen prelude and
coda; a fine-tune killed by SIGKILL and resumed equals an uninterrupted one; the export round-trips bit-exact."""

import json
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import huginn_tokenizer
import xla_env
from rdlm import checkpoint_io
from rdlm.data import chat, prepare
from rdlm.interop import convert
from rdlm.model import RecurrentLM
from test_train import REPO, _losses, _wait_for_step

def test_sft_config_takes_model_and_depth_from_the_checkpoint(huginn_tiny_dir):
    from configs import sft

    c = sft.get_config(str(huginn_tiny_dir / "checkpoint"))
    assert c.init_from == str(huginn_tiny_dir / "checkpoint") and (c.model.n_embd, c.model.n_layers_in_coda) == (64, 2)
    assert (c.recurrence.mean, c.recurrence.backprop, c.recurrence.fixed) == (8, 4, 0)  # the paper's depth sampling
    assert (c.optim.schedule, c.optim.warmup_steps, c.data.source, c.data.seq_len) == ("warmup_constant", 20,
                                                                                        "arrayrecord", 128)
    named = sft.get_config("tiny_window")
    assert named.init_from == "" and named.model.attention_window == 2 and named.optim.lr == 1e-5
    assert sft.get_config("tiny").model.attention_window is None  # the main job is exact Huginn


def _conversations(n):
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        yield {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                            {"role": "assistant", "content": f"{a} + {b} = {a + b}. #### {a + b}"}]}


@pytest.fixture(scope="module")
def base_and_chat(tmp_path_factory, huginn_tiny_dir):
    """The tiny HF fixture with a tokenizer.json carrying huginn's chat tokens, and chat shards made with it."""
    base = tmp_path_factory.mktemp("base") / "hf"
    shutil.copytree(huginn_tiny_dir / "checkpoint", base)
    huginn_tokenizer.write_bpe(base)
    data = tmp_path_factory.mktemp("chat")
    (data / "conv.jsonl").write_text("".join(json.dumps(c) + "\n" for c in _conversations(48)))
    prepare.prepare_chat(str(data / "conv.jsonl"), str(data / "shards"), tokenizer=str(base / "tokenizer.json"))
    return base, data / "shards"


def _sft_args(workdir, base, shards):
    args = [
        sys.executable, "-m", "rdlm.train", f"--config=configs/sft.py:{base}", f"--workdir={workdir}",
        f"--config.data.paths={shards}/*.array_record", "--config.data.seq_len=64", "--config.data.eval_documents=8",
        "--config.data.eval_batches=1", "--config.train.batch_size=8", "--config.train.num_steps=6",
        "--config.optim.lr=1e-3", "--config.optim.warmup_steps=2", "--config.optim.freeze=prelude,coda",
        "--config.recurrence.mean=3", "--config.recurrence.backprop=2", "--config.checkpoint.every_steps=3",
        "--config.checkpoint.async_save=False", "--config.log.every_steps=1", "--config.eval.batch_size=8",
        "--config.eval.final_num_steps=(1, 4)",
    ]
    env = {**__import__("os").environ, "XLA_FLAGS": xla_env.xla_flags(8), "JAX_PLATFORMS": "cpu"}
    return args, env


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_sft_freezes_resumes_after_sigkill_and_exports_bit_exact(base_and_chat, tmp_path):
    base, shards = base_and_chat
    straight = tmp_path / "straight"
    args, env = _sft_args(straight, base, shards)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # The frozen prelude and coda (with ln_f) are bit-identical to the base; the core moved.
    _, before = checkpoint_io.load_params(base, as_numpy=True)
    _, after = checkpoint_io.load_params(straight, as_numpy=True)
    before, after = _flat(before), _flat(after)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("['prelude']", "['coda']", "['ln_f']"))]
    assert frozen and all(before[k].tobytes() == after[k].tobytes() for k in frozen)
    assert not np.array_equal(before["['core']['adapter']"], after["['core']['adapter']"])
    saved = json.loads((straight / "recurrence_scaling.json").read_text())
    assert saved["num_steps"] == [1, 4] and all(np.isfinite(saved["val_loss"]))

    # Killed between checkpoints, then resumed by rerunning the same command: the same losses, step by step.
    killed = tmp_path / "killed"
    args, env = _sft_args(killed, base, shards)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(killed, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "6").exists()
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step

    # to-hf of the fine-tuned run: huginn's layout with the chat tokenizer, the same tensors bit for bit, the same
    # logits, and back to Orbax bit-exact.
    hf, orbax = tmp_path / "hf", tmp_path / "orbax"
    convert.convert("to-hf", str(straight), str(hf))
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in hf.iterdir()}
    assert (hf / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert checkpoint_io.kind_of(hf) == "hf"
    convert.convert("to-orbax", str(hf), str(orbax))
    run_config, run_params = checkpoint_io.load_params(straight)
    for other in (hf, orbax):
        _, params = checkpoint_io.load_params(other, as_numpy=True)
        assert {k: v.tobytes() for k, v in _flat(params).items()} == {k: v.tobytes() for k, v in after.items()}
    hf_config, hf_params = checkpoint_io.load_params(hf)
    encoder = chat.ChatTokenizer.from_file(hf / "tokenizer.json")
    ids = jnp.asarray(encoder.prompt_ids(next(_conversations(1))["messages"][:1]))[None]

    def logits(config, params):
        return np.asarray(RecurrentLM(config).apply({"params": params}, ids, num_steps=4, init_scale=0.0).logits)

    np.testing.assert_array_equal(logits(hf_config, hf_params), logits(run_config, run_params))
