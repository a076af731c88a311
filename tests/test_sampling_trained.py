"""Adaptive exit, the parallel sampler, bf16 and `bench generate` on a model trained with the windowed recipe
(slow: the recipe runs 200 steps first). On a trained model the latent converges, so every fast sampler must
give (nearly) the tokens of plain fixed-depth greedy decoding, with fewer iterations per token."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rdlm import bench_generate, checkpoint_io
from rdlm.model import RecurrentLM
from rdlm.sampling import ParallelSettings, generate, generate_parallel, precision, text

ROOT = pathlib.Path(__file__).resolve().parents[1]
R, NEW = 16, 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from configs import tiny_window
    from rdlm.train import train_and_evaluate

    root = tmp_path_factory.mktemp("trained")
    config = tiny_window.get_config()
    config.train.num_steps = 200
    config.eval.final_num_steps = ()
    config.data.cache_dir = str(root / "cache")
    config.mesh.shape = (1, 1, 1)
    train_and_evaluate(config, str(root / "run"), devices=jax.devices()[:1])
    model_config, params = checkpoint_io.load_params(root / "run")
    prompts, kinds = bench_generate.heldout_prompts(root / "run", 8, 24, seed=0)
    assert kinds == {"code": 4, "problem": 4} and prompts.shape == (8, 24)
    codec = text.load_codec(root / "run")
    assert codec.decode(prompts[1]).endswith("=")  # a held-out problem, its answer left to the model
    fixed = generate(model_config, params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0)
    return root / "run", model_config, params, prompts, np.asarray(fixed.new_tokens())


def agreement(out, fixed) -> float:
    return float(np.mean(np.asarray(out.new_tokens()) == fixed))


@pytest.mark.parametrize("criterion, threshold", [("kl", 5e-4), ("latent-diff", 0.03)])
def test_adaptive_exit_saves_iterations_and_keeps_the_tokens(trained, criterion, threshold):
    _, config, params, prompts, fixed = trained
    out = generate(config, params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0,
                   exit_criterion=criterion, exit_threshold=threshold)
    steps = np.asarray(out.steps_per_token)
    print(f"{criterion}:{threshold} at r={R}: {steps.mean():.2f} iterations per token, "
          f"agreement {agreement(out, fixed):.3f}")
    assert steps.mean() < 0.75 * R
    assert agreement(out, fixed) >= 0.9


def test_parallel_sampler_agrees_with_sequential_greedy(trained):
    _, config, params, prompts, fixed = trained
    for settings in (ParallelSettings(), ParallelSettings(ema_embeds=0.1, state_noise=0.5)):
        out = generate_parallel(config, params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0,
                                settings=settings)
        steps = np.asarray(out.steps_per_token)
        print(f"parallel {settings}: {int(out.passes)} passes for {prompts.shape[0] * NEW} tokens, "
              f"{steps.mean():.2f} iterations per token, agreement {agreement(out, fixed):.3f}")
        assert agreement(out, fixed) >= 0.9
        assert int(out.passes) < prompts.shape[0] * NEW * R // settings.inner_steps // 2


def test_bfloat16_generation_agrees_with_float32(trained):
    """bf16 moves logits by about 0.1 here, which flips a few percent of near-tied next tokens: asserted under
    teacher forcing (along float32's greedy tokens); free-running, one flip changes the rest of the row."""
    _, config, params, prompts, fixed = trained
    bf_config, bf_params = precision.with_dtype(config, params, "bfloat16")
    tokens = np.concatenate([prompts, fixed], axis=1)
    logits = {name: np.asarray(RecurrentLM(c).apply({"params": p}, tokens, num_steps=R, init_scale=0.0).logits)
              for name, c, p in (("float32", config, params), ("bfloat16", bf_config, bf_params))}
    generated = slice(prompts.shape[1] - 1, -1)  # the positions that predict the generated tokens
    forced = np.mean(np.argmax(logits["bfloat16"][:, generated], -1) == fixed)
    np.testing.assert_array_equal(np.argmax(logits["float32"][:, generated], -1), fixed)  # cached = full forward
    out = generate(bf_config, bf_params, prompts, max_new_tokens=NEW, num_steps=R, init_scale=0.0)
    print(f"bf16 at r={R}: teacher-forced agreement {forced:.3f}, free-running {agreement(out, fixed):.3f}, "
          f"logits max abs diff {np.abs(logits['bfloat16'] - logits['float32']).max():.3f}")
    assert forced >= 0.9
    assert np.mean(np.asarray(out.new_tokens())[:, 0] == fixed[:, 0]) >= 0.75  # the first token of each row


def test_bench_generate_on_the_checkpoint_prints_every_figure(trained):
    workdir = trained[0]
    cmd = [sys.executable, "-m", "rdlm.bench", "generate", f"--checkpoint={workdir}", "--num_steps=8",
           "--exit=kl:5e-4", "--compare", "--config.bench.gen_prompts=2", "--config.bench.gen_repeats=2",
           "--config.bench.new_tokens=8", "--config.bench.prompt_len=16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(workdir) and result["prompt_kinds"] == {"code": 1, "problem": 1}
    assert result["exit"] == "kl:0.0005" and result["check_every"] == 3 and result["num_steps"] == 8
    for key in ("new_tokens_per_s", "cpu_new_tokens_per_s", "compile_s", "speedup", "cpu_speedup"):
        assert result[key] > 0, key
    assert 1 <= result["mean_steps_per_token"] <= 8 and 0 <= result["agreement"] <= 1
    assert result["baseline"]["mean_steps_per_token"] == 8
