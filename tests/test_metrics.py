"""Metric files read back, the progress line, collapse diagnostics and the FLOP count."""

import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from rdlm import metrics


def test_writer_files_read_back(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 3.5, "lr": np.float32(1e-4), "tokens": np.int64(4096)})
    writer.write(2, {"loss": jnp.array(3.25), "grad_norm": float("nan")})
    writer.write_text(2, "sample", "hello world")
    writer.close()

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 2]
    assert lines[0]["loss"] == 3.5 and lines[0]["tokens"] == 4096
    assert abs(lines[0]["lr"] - 1e-4) < 1e-10
    assert lines[1]["loss"] == 3.25 and lines[1]["grad_norm"] is None
    assert lines[2]["sample"] == "hello world"

    events = metrics.read_events(tmp_path / "tensorboard")
    scalars = {(tag, step): v for tag, step, v in events if not isinstance(v, str)}
    assert scalars[("loss", 1)] == 3.5 and scalars[("loss", 2)] == 3.25
    assert abs(scalars[("lr", 1)] - 1e-4) < 1e-10 and scalars[("tokens", 1)] == 4096
    assert np.isnan(scalars[("grad_norm", 2)])
    assert any(tag.startswith("sample") and v == "hello world" for tag, _, v in events)


def test_resume_appends_and_readers_drop_stale_steps(tmp_path):
    first = metrics.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        first.write(step, {"loss": 10.0 - step})
    first.close()
    resumed = metrics.MetricsWriter(tmp_path, resume_step=2)
    resumed.write(3, {"loss": 1.0})
    resumed.write(3, {"eval_loss": 2.0})
    resumed.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6
    records = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 9.0), (2, 8.0), (3, 1.0)]
    assert records[-1]["eval_loss"] == 2.0
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_non_primary_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(tmp_path / "run", is_primary=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_progress_lines_for_logs():
    now = [100.0]
    out = io.StringIO()
    bar = metrics.ProgressBar(
        10, tokens_per_step=2000, stream=out, interval_s=5.0, clock=lambda: now[0]
    )
    for step in range(1, 11):
        bar.update(step, loss=5.0 / step)
        now[0] += 2.0  # 2 s per step
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/10 (10.0%) | loss 5.0000"
    # printed at most every 5 s, and at the last step; 1000 tok/s, 2 s/step
    assert lines[1] == "step 4/10 (40.0%) | loss 1.2500 | 1.00k tok/s | 2 s/step | ETA 0:00:12"
    assert len(lines) == 4
    assert lines[-1].startswith("step 10/10 (100.0%) | loss 0.5000 | 1.00k tok/s")


def test_token_correlation():
    corr = jax.jit(metrics.token_correlation)
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, 1, 64))
    identical = jnp.asarray(np.broadcast_to(row, (2, 8, 64)), jnp.bfloat16)
    np.testing.assert_allclose(corr(identical), 1.0, atol=1e-5)
    random = jnp.asarray(rng.normal(size=(2, 16, 512)))
    assert abs(float(corr(random))) < 0.02
    # against the explicit Gram matrix, off-diagonal mean
    x = rng.normal(size=(3, 5, 8)) + 0.5 * rng.normal(size=(3, 1, 8))
    c = x - x.mean(-1, keepdims=True)
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    gram = np.einsum("bsd,btd->bst", c, c)
    expected = (gram.sum() - np.trace(gram, axis1=1, axis2=2).sum()) / (3 * 5 * 4)
    np.testing.assert_allclose(corr(jnp.asarray(x)), expected, rtol=1e-5)


def test_relative_state_change_and_rms():
    s_prev = jnp.array([[[3.0, 4.0], [1.0, 0.0]]])
    s_new = jnp.array([[[3.0, 0.0], [2.0, 0.0]]])
    # token 0: |(0, -4)| / |(3, 0)| = 4/3; token 1: 1 / 2
    np.testing.assert_allclose(metrics.relative_state_change(s_new, s_prev), (4 / 3 + 0.5) / 2)
    tree = {"a": jnp.array([1.0, -1.0, 3.0]), "b": {"c": jnp.array([[1.0]], jnp.bfloat16)}}
    np.testing.assert_allclose(metrics.rms(tree), np.sqrt(12 / 4))


def test_model_flops_per_token_hand_count():
    config = types.SimpleNamespace(
        vocab_size=10,
        n_embd=4,
        n_heads=2,
        head_dim=3,
        intermediate_size=5,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
    )
    seq_len, n, k = 7, 3, 2
    # weights per block: qkv 4x18 = 72, proj 6x4 = 24, fc 4x10 = 40, mlp proj 5x4 = 20 -> 156
    # block forward: 2 * 156 + causal attention 2 * 7 * 6 = 84 -> 396; adapter 2 * 8 * 4 = 64
    core = 2 * 396 + 64  # 856 per iteration
    with_grad = 2 * 396 + 2 * 4 * 10 + k * core  # prelude + coda, head 80, two iterations
    assert with_grad == 792 + 80 + 1712
    expected = 3 * with_grad + n * core
    assert metrics.model_flops_per_token(config, seq_len, n, k) == expected == 10320
