"""The bench: every promised key with sane values, the FLOP count, one compile for every n, and the flash
attention backends against the XLA path."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from rdlm import bench, metrics, perf
from rdlm.model import ModelConfig, attention
from rdlm.program import model_config_from

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import bench_cpu, tiny  # noqa: E402

# A reduced bench_cpu: the same code paths, small enough to compile and run in seconds.
SMALL = dict(n_embd=32, n_heads=2, intermediate_size=64, vocab_size=128, block_size=32,
             n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1)
SMALL_FLAGS = [f"--config.model.{k}={v}" for k, v in SMALL.items()] + [
    "--config.data.seq_len=16", "--config.train.batch_size=2", "--config.bench.warmup_steps=1",
]


def small_config():
    c = bench_cpu.get_config()
    for key, value in SMALL.items():
        c.model[key] = value
    c.data.seq_len, c.train.batch_size, c.bench.warmup_steps = 16, 2, 1
    c.bench.prompt_len, c.bench.new_tokens, c.bench.gen_num_steps, c.bench.gen_repeats = 6, 4, 3, 2
    return c


def assert_positive_finite(result, keys):
    for key in keys:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])


def test_train_prints_one_json_line_with_every_key():
    """On the main job's config (any config has the bench section), reduced to the small shape."""
    cmd = [sys.executable, "-m", "rdlm.bench", "train", "--config=configs/tiny.py", *SMALL_FLAGS,
           "--num_steps=3,1", "--steps=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert set(bench.TRAIN_KEYS) <= set(result)
    assert_positive_finite(result, [k for k in bench.TRAIN_KEYS if k != "num_steps"])
    assert 0 < result["mfu"] <= 1
    assert result["num_steps"] == [3, 1]
    model_config = ModelConfig(**{**tiny.get_config().model.to_dict(), **SMALL}, mean_recurrence=8)
    assert result["model_flops_per_token"] == metrics.model_flops_per_token(model_config, 16, 3, 1)
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / result["step_s_median"], rel=1e-2)
    assert result["achieved_tflops"] == pytest.approx(result["mfu"] * result["peak_tflops"], rel=2e-2, abs=2e-4)


def test_flops_match_a_hand_count():
    c = ModelConfig(vocab_size=10, n_embd=8, n_heads=2, intermediate_size=12, n_layers_in_prelude=1,
                    n_layers_in_recurrent_block=2, n_layers_in_coda=1, block_size=4)
    S, n, k = 4, 3, 2
    qkv_and_out = 2 * (8 * 3 * 8 + 8 * 8)  # 2 FLOPs per weight: Wqkv [8, 24] and Wo [8, 8]
    mlp = 2 * (8 * 2 * 12 + 12 * 8)  # fc [8, 2 * 12] (gate and up) and proj [12, 8]
    causal_attention = (2 * S * 8 + 2 * S * 8) // 2  # q.k and p.v over S keys, half of them under the causal mask
    block = qkv_and_out + mlp + causal_attention
    assert block == 1152
    core_iteration = 2 * block + 2 * (16 * 8)  # two core blocks and the [2D, D] adapter
    forward_with_grad = 2 * block + 2 * 8 * 10 + k * core_iteration  # prelude + coda, tied head, k iterations
    expected = 3 * forward_with_grad + n * core_iteration  # forward + backward (2x); no-grad steps forward only
    assert expected == 30432
    assert metrics.model_flops_per_token(c, S, n, k) == expected


def test_one_compile_for_every_n_and_memory_independent_of_n(tmp_path):
    config = small_config()
    train = bench.TrainBench(config, k=1)
    losses = []
    with train.context():
        for n in (0, 5, 17):
            train.state, loss = train.step(train.state, train.batch, jnp.int32(n))
            losses.append(float(loss))
    assert train.step._cache_size() == 1
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == 3
    rows = bench.bench_sweep(config, 1, (0, 9), 1, train=train)
    assert [r["r"] for r in rows] == [1, 10]
    assert rows[0]["temp_bytes"] == rows[1]["temp_bytes"]  # one program for every n
    for row in rows:
        assert_positive_finite(row, ("compile_s", "step_s_median", "temp_bytes", "argument_bytes"))
    bench.plot_sweep(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "compile s" in bench.format_sweep(rows)


def test_generate_reports_speed_steps_and_agreement():
    from rdlm import bench_generate

    config = small_config()
    config.bench.gen_prompts = 2
    result = bench_generate.bench_generate(config, bench_generate.Variant(exit="kl:5e-4"), compare=True,
                                           model_config=model_config_from(config))
    assert_positive_finite(result, ("new_tokens_per_s", "cpu_new_tokens_per_s", "seconds", "compile_s",
                                    "mean_steps_per_token", "speedup", "cpu_speedup"))
    assert 1 <= result["mean_steps_per_token"] <= 3 and 0 <= result["agreement"] <= 1
    assert result["new_tokens"] == 4 and result["prompts"] == 2 and result["check_every"] == 3
    assert result["baseline"]["mean_steps_per_token"] == 3  # fixed depth
    assert 1 <= result["mean_prompt_steps"] <= 3 and result["exit_in_prefill"] is True
    plain = bench_generate.bench_generate(config, bench_generate.Variant(), model_config=model_config_from(config))
    assert plain["agreement"] == 1.0 and "speedup" not in plain and "exit" not in plain
    assert plain["mean_prompt_steps"] == 3  # no exit: the prompt at full depth


def _generate(config, **variant):
    from rdlm import bench_generate

    return bench_generate.bench_generate(config, bench_generate.Variant(**variant),
                                         model_config=model_config_from(config))


def _with(config, **bench_fields):
    config.bench.update(bench_fields)
    return config


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c: bench.run("profile", c), "Unknown subcommand 'profile'; use one of train, generate, sweep"),
        (lambda c: bench.parse_num_steps("24"), "must be two non-negative integers N,K"),
        (lambda c: bench.parse_num_steps("a,8"), "must be two non-negative integers N,K"),
        (lambda c: bench.parse_num_steps("24,-1"), "must be two non-negative integers N,K"),
        (lambda c: _generate(_with(c, gen_repeats=0)), r"config.bench.gen_repeats=0 must be >= 1"),
        (lambda c: _generate(_with(c, gen_prompts=3), batch=2), r"gen_prompts=3 must be a positive multiple of --batch=2"),
        (lambda c: _generate(c, sampler="diffusion"), r"--sampler='diffusion' is not one of sequential"),
        (lambda c: _generate(c, dtype="float16"), r"--dtype='float16' is not one of float32, bfloat16"),
        (lambda c: _generate(c, sampler="parallel", exit="kl"), r"--exit works with --sampler=sequential"),
        (lambda c: _generate(c, check_every=2), r"--check_every needs an --exit criterion"),
        (lambda c: _generate(c, exit_in_prefill=False), r"--noexit_in_prefill needs an --exit criterion"),
        (lambda c: bench.parse_gen_steps("8,2"), r"--num_steps='8,2' must be one integer >= 1 for generate"),
    ],
)
def test_bad_arguments_get_one_clear_sentence(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_config())


def test_every_shipped_config_can_be_benchmarked():
    """The bench section lives in configs/base.py, so `rdlm.bench train --config=configs/tiny.py` (or 3b5)
    runs (test_train_prints_one_json_line_with_every_key runs tiny) instead of AttributeError: 'bench'."""
    import importlib

    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        assert len(config.bench.num_steps) == 2 and config.bench.steps >= 1, path.name


def test_cli_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "rdlm.bench", "train", "--num_steps=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --num_steps='8' must be two non-negative integers")


def _attention_inputs(S=128, H=2, K=16):
    q, k, v, g = (jax.random.normal(jax.random.key(i), (2, S, H, K)) for i in range(4))
    segments = jnp.asarray([[1] * 50 + [2] * (S - 50), [1] * (S - 8) + [0] * 8])  # two documents; padding
    return q, k, v, g, segments


def _attention_and_grads(impl, window, inputs):
    q, k, v, g, segments = inputs
    f = lambda q, k, v: attention.attend(q, k, v, segments, window, None, impl)  # noqa: E731
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * g), argnums=(0, 1, 2)))(q, k, v)
    return jax.jit(f)(q, k, v), grads


def _dense_softmax_attention(q, k, v, segments, window):
    """Softmax attention over the whole [S, S] mask, differentiated by JAX: the reference for the XLA path."""
    mask = attention.self_mask(segments, window)[:, None]
    logits = jnp.einsum("bshk,bthk->bhst", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("bhst,bthk->bshk", jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), v)


@pytest.mark.parametrize("window", [None, 7])
def test_blocked_xla_attention_equals_dense_attention_with_gradients(window):
    """Four query blocks against one [S, S] softmax, with two documents and padding rows."""
    inputs = _attention_inputs(S=256)
    q, k, v, g, segments = inputs
    want = _dense_softmax_attention(q, k, v, segments, window)
    want_grads = jax.grad(lambda q, k, v: jnp.sum(_dense_softmax_attention(q, k, v, segments, window) * g),
                          argnums=(0, 1, 2))(q, k, v)
    got, got_grads = _attention_and_grads("xla", window, inputs)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-6)


@pytest.mark.parametrize("window", [None, 7])
def test_splash_equals_xla_with_segments_and_window(window):
    """TPU splash attention, in Pallas interpret mode on CPU: same outputs and gradients as the XLA path."""
    inputs = _attention_inputs()
    want, want_grads = _attention_and_grads("xla", window, inputs)
    got, got_grads = _attention_and_grads("splash", window, inputs)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_splash_runs_per_shard_on_a_mesh():
    import flax.linen as nn

    inputs = _attention_inputs()
    want, want_grads = _attention_and_grads("xla", 7, inputs)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("activation_batch", ("data", "fsdp")), ("activation_length", None), ("heads", "tensor"), ("head_dim", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got, got_grads = _attention_and_grads("splash", 7, inputs)
    np.testing.assert_allclose(got, want, atol=2e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-6)


def test_splash_rejects_a_sequence_it_cannot_tile():
    q, k, v, _, _ = _attention_inputs()
    with pytest.raises(ValueError, match="multiple of 128; got 100"):
        attention.attend(q[:, :100], k[:, :100], v[:, :100], jnp.ones((2, 100), jnp.int32), None, None, "splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a CUDA GPU; none is present")
def test_cudnn_equals_xla_with_segments_and_window():
    q, k, v, g, segments = _attention_inputs(H=4, K=64)
    inputs = tuple(x.astype(jnp.bfloat16) for x in (q, k, v, g)) + (segments,)
    for window in (None, 7):
        want, _ = _attention_and_grads("xla", window, inputs)
        got, _ = _attention_and_grads("cudnn", window, inputs)
        np.testing.assert_allclose(np.float32(got), np.float32(want), atol=2e-2)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error raised where no GPU is present")
def test_cudnn_without_a_gpu_is_one_clear_sentence():
    q, k, v, _, segments = _attention_inputs()
    with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs a GPU"):
        attention.attend(q, k, v, segments, None, None, "cudnn")


def test_peak_is_measured_under_a_multi_device_training_mesh():
    """rdlm.train measures the peak (log.peak_tflops = 0, the default) inside its mesh's context."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert perf.measure_peak_tflops(size=256, repeats=1) > 0
