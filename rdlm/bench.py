"""Benchmarks of training and generation, each printing what it measured.

    python -m rdlm.bench train --config=configs/bench_cpu.py [--config.x=y] [--num_steps=N,K] [--steps=S]
        [--trace_dir=DIR]
    python -m rdlm.bench generate [--checkpoint=runs/tiny] [--num_steps=32] [--exit=kl:5e-4] [--check_every=C]
        [--noexit_in_prefill] [--sampler=sequential|speculative|parallel] [--dtype=float32|bfloat16] [--batch=B]
        [--compare]
    python -m rdlm.bench sweep --config=configs/bench_cpu.py [--sweep_n=0,24,120] [--out=sweep.png]

`train` prints one JSON line: compile time, median step time, tokens/s, model FLOPs per token
(rdlm.metrics.model_flops_per_token), achieved TFLOP/s, the peak of a large float32 matmul measured
in the same process, MFU and the compiled step's memory. The step is the training update at a fixed
depth: n iterations without gradient (a traced int, so one program serves every n) and k with
gradient (static). `generate` (rdlm.bench_generate) times greedy generation of a trained or random model
and prints one JSON line: new tokens/s, iterations per token, agreement with fixed-depth float32 decoding
and, with --compare, the speed-up over it measured alternately. `sweep` compiles and times the step at
each n (k fixed) and prints a table and JSON."""

# ruff: noqa: E402 (the huge-pages restart runs before the heavy imports, so that they load once)
from rdlm import cli

if __name__ == "__main__":
    cli.restart_with_huge_pages()

import contextlib
import json
import math
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import flags
from ml_collections import config_flags

from rdlm import metrics, optim, perf, sharding, state as state_lib, steps, storage
from rdlm.model import RecurrentLM
from rdlm.program import model_config_from

SUBCOMMANDS = ("train", "generate", "sweep")
TRAIN_KEYS = (
    "num_steps",
    "batch_size",
    "seq_len",
    "compile_s",
    "step_s_median",
    "tokens_per_s",
    "model_flops_per_token",
    "achieved_tflops",
    "peak_tflops",
    "mfu",
    "temp_bytes",
    "argument_bytes",
)


def parse_num_steps(text: str) -> tuple[int, int]:
    """'24,8' -> (24, 8); anything else is one clear sentence."""
    parts = text.split(",")
    try:
        n, k = (int(p) for p in parts)
    except ValueError:
        n = k = -1
    if len(parts) != 2 or n < 0 or k < 0:
        raise ValueError(
            f"--num_steps={text!r} must be two non-negative integers N,K (iterations without and with gradient), e.g. 24,8."
        )
    return n, k


def synthetic_batch(config, rng) -> dict:
    """A batch of uniform random tokens in the train step's layout (one document per row)."""
    B, S, V = config.train.batch_size, config.data.seq_len, config.model.vocab_size
    ids = jax.random.randint(rng, (B, S + 1), 0, V, jnp.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
        "segment_ids": jnp.ones((B, S), jnp.int32),
        "weights": jnp.ones((B, S), jnp.float32),
    }


def make_fixed_depth_step(model: RecurrentLM, tx, k: int, rng):
    """`step(state, batch, n) -> (state, loss)`: the train step's update at depth (n, k), n traced, k static."""

    def step(state, batch, n):
        state_rng = jax.random.fold_in(rng, state.step)
        loss_fn = lambda p: steps.weighted_loss(model, p, batch, (n, k), state_rng)  # noqa: E731
        (loss_sum, (weight_sum, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        denominator = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss_sum / denominator

    return step


class TrainBench:
    """A fresh train state and the jitted fixed-depth step for one config and k."""

    def __init__(self, config, k: int):
        self.config, self.k = config, k
        self.model_config = model_config_from(config)
        self.model = RecurrentLM(self.model_config)
        self.tx = optim.make_optimizer(config, accumulate=False)
        self.mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        self.rules = sharding.check_rules(config.mesh.rules, self.mesh)
        rng = jax.random.key(config.bench.seed)
        with self.context():
            self.state = state_lib.init_state(self.model, self.tx, rng, self.mesh, self.rules, config.data.seq_len)
        self.batch = synthetic_batch(config, jax.random.fold_in(rng, 1))
        # The state keeps its shardings from step to step (else the second call would compile again).
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        replicated = sharding.replicated(self.mesh)
        self.step = jax.jit(
            make_fixed_depth_step(self.model, self.tx, k, jax.random.fold_in(rng, 2)),
            in_shardings=(shardings, replicated, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=0,
        )

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules, as the training loop runs under them."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def compile(self, n: int):
        """(compiled step, seconds to lower and compile it from scratch)."""
        jax.clear_caches()  # compile from scratch, so that a sweep over n times every compile
        start = time.perf_counter()
        with self.context():
            compiled = self.step.lower(self.state, self.batch, jnp.int32(n)).compile()
        return compiled, time.perf_counter() - start

    def time_steps(self, compiled, n: int, steps_: int, warmup: int) -> list[float]:
        """Seconds of each of `steps_` steps after `warmup` untimed ones (the state advances)."""
        n_arr, times = jnp.int32(n), []
        for i in range(warmup + steps_):
            start = time.perf_counter()
            self.state, loss = compiled(self.state, self.batch, n_arr)
            loss.block_until_ready()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"The bench's loss became {float(loss)}; the config is unstable.")
        return times


def memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {"temp_bytes": int(analysis.temp_size_in_bytes), "argument_bytes": int(analysis.argument_size_in_bytes)}


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def bench_train(
    config, num_steps: tuple[int, int], steps_: int, peak_tflops: float | None = None, trace_dir: str = ""
) -> dict:
    """The train step at (n, k); with `trace_dir`, one more step is traced there (jax.profiler, Perfetto)."""
    n, k = num_steps
    bench = TrainBench(config, k)
    compiled, compile_s = bench.compile(n)
    times = bench.time_steps(compiled, n, steps_, config.bench.warmup_steps)
    if trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            bench.time_steps(compiled, n, 1, 0)
    peak = perf.measure_peak_tflops() if peak_tflops is None else peak_tflops
    step_s = statistics.median(times)
    tokens = config.train.batch_size * config.data.seq_len
    flops = metrics.model_flops_per_token(bench.model_config, config.data.seq_len, n, k)
    achieved = flops * tokens / step_s / 1e12
    return {
        "num_steps": [n, k],
        "batch_size": config.train.batch_size,
        "seq_len": config.data.seq_len,
        "compile_s": _sig(compile_s),
        "step_s_median": _sig(step_s),
        "step_s_min": _sig(min(times)),
        "tokens_per_s": _sig(tokens / step_s),
        "model_flops_per_token": flops,
        "achieved_tflops": _sig(achieved),
        "peak_tflops": _sig(peak),
        "mfu": _sig(achieved / peak),
        **memory(compiled),
    }


def bench_sweep(config, k: int, ns, steps_: int, train: TrainBench | None = None) -> list[dict]:
    """Compile time, memory and step time at each n (k fixed); every n is compiled afresh to time it."""
    train = TrainBench(config, k) if train is None else train
    rows = []
    for n in ns:
        compiled, compile_s = train.compile(n)
        times = train.time_steps(compiled, n, steps_, 1)
        rows.append(
            {
                "n": n,
                "k": k,
                "r": n + k,
                "compile_s": _sig(compile_s),
                "step_s_median": _sig(statistics.median(times)),
                **memory(compiled),
            }
        )
    return rows


def format_sweep(rows) -> str:
    lines = [f"{'r':>5} {'n':>5} {'k':>3} {'compile s':>10} {'step s':>9} {'temp MB':>9} {'args MB':>9}"]
    for r in rows:
        lines.append(
            f"{r['r']:>5} {r['n']:>5} {r['k']:>3} {r['compile_s']:>10.3f} {r['step_s_median']:>9.4f} "
            f"{r['temp_bytes'] / 2**20:>9.2f} {r['argument_bytes'] / 2**20:>9.2f}"
        )
    return "\n".join(lines)


def plot_sweep(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["r"] for row in rows]
    panels = (("step_s_median", "step time (s)"), ("compile_s", "compile time (s)"), ("temp_bytes", "temp memory (MB)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (key, label) in zip(axes, panels):
        values = [row[key] / (2**20 if key == "temp_bytes" else 1) for row in rows]
        ax.plot(r, values, "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("r = n + k")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
    fig.suptitle(f"train step against depth (k = {rows[0]['k']})")
    fig.tight_layout()
    with storage.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/bench_cpu.py", "Bench config, e.g. configs/bench_cpu.py.", lock_config=True, flag_values=FLAGS
)
_NUM_STEPS = flags.DEFINE_string(
    "num_steps", "",
    "train/sweep: 'N,K' (default: the config's bench.num_steps); generate: r (default: bench.gen_num_steps).",
    flag_values=FLAGS,
)
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps (default: the config's bench.steps).", flag_values=FLAGS)
_EXIT = flags.DEFINE_string(
    "exit", "", "generate: adaptive exit 'criterion[:threshold]', e.g. kl:5e-4.", flag_values=FLAGS
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "generate: a trained model (workdir, Orbax step or HF directory); '' = random init.",
    flag_values=FLAGS,
)
_CHECK_EVERY = flags.DEFINE_integer(
    "check_every", 0, "generate: check the exit criterion every C iterations; 0 = its default.", flag_values=FLAGS
)
_EXIT_IN_PREFILL = flags.DEFINE_boolean(
    "exit_in_prefill", True, "generate: the prompt's iterations stop by the exit criterion too (the reference's "
    "default); --noexit_in_prefill runs the prompt at full depth.", flag_values=FLAGS
)
_SAMPLER = flags.DEFINE_string("sampler", "sequential", "generate: sequential, speculative or parallel.",
                               flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "float32", "generate: float32 or bfloat16 weights and compute.",
                             flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 1, "generate: prompts per call.", flag_values=FLAGS)
_COMPARE = flags.DEFINE_boolean(
    "compare", False, "generate: time the fixed-depth float32 batch-1 baseline alternately, report the speed-up.",
    flag_values=FLAGS,
)
_OUT = flags.DEFINE_string("out", "", "sweep: write the plot to this PNG.", flag_values=FLAGS)
_SWEEP_N = flags.DEFINE_string(
    "sweep_n", "", "sweep: comma-separated n (default: the config's bench.sweep_n).", flag_values=FLAGS
)
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", "", "train: trace one extra step into this directory (jax.profiler).", flag_values=FLAGS
)


def parse_gen_steps(text: str) -> int:
    """generate's --num_steps: one int >= 1 ('' = the config's)."""
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--num_steps={text!r} must be one integer >= 1 for generate (core iterations per token).")
    return value


def run_generate(config) -> dict:
    """`generate` with the flags' variant (rdlm.bench_generate)."""
    from rdlm import bench_generate

    variant = bench_generate.Variant(sampler=_SAMPLER.value, exit=_EXIT.value, check_every=_CHECK_EVERY.value,
                                     exit_in_prefill=_EXIT_IN_PREFILL.value, dtype=_DTYPE.value, batch=_BATCH.value)
    model_config = None if _CHECKPOINT.value else model_config_from(config)
    return bench_generate.bench_generate(config, variant, checkpoint=_CHECKPOINT.value,
                                         num_steps=parse_gen_steps(_NUM_STEPS.value), compare=_COMPARE.value,
                                         model_config=model_config)


def run(command: str, config) -> None:
    """Runs one subcommand and prints its result."""
    if command not in SUBCOMMANDS:
        raise ValueError(f"Unknown subcommand {command!r}; use one of {', '.join(SUBCOMMANDS)}.")
    if command == "generate":
        print(json.dumps(run_generate(config)), flush=True)
        return
    num_steps = parse_num_steps(_NUM_STEPS.value) if _NUM_STEPS.value else tuple(config.bench.num_steps)
    steps_ = _STEPS.value or (config.bench.sweep_steps if command == "sweep" else config.bench.steps)
    if steps_ < 1:
        raise ValueError(f"--steps={steps_} must be >= 1.")
    if command == "train":
        print(json.dumps(bench_train(config, num_steps, steps_, trace_dir=_TRACE_DIR.value)), flush=True)
    else:
        ns = [int(x) for x in _SWEEP_N.value.split(",")] if _SWEEP_N.value else list(config.bench.sweep_n)
        rows = bench_sweep(config, num_steps[1], ns, steps_)
        print(format_sweep(rows), flush=True)
        print(json.dumps(rows), flush=True)
        if _OUT.value:
            plot_sweep(rows, _OUT.value)


def main(argv):
    if len(argv) != 2:
        cli.fail(f"give one subcommand, one of {', '.join(SUBCOMMANDS)}; got {argv[1:] or 'none'}.")
    run(argv[1], _CONFIG.value)


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__)
