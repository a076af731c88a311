"""Training: `python -m rdlm.train --config=configs/tiny.py --workdir=runs/tiny`.

`train_and_evaluate(config, workdir)` resumes from the workdir's newest complete checkpoint (model,
optimizer and data-iterator state), trains to `train.num_steps`, saving every
`checkpoint.every_steps` and on SIGTERM, and ends with the recurrence-scaling table: held-out
accuracy and validation loss against test-time r.
"""

# ruff: noqa: E402 (the huge-pages restart runs before the heavy imports, so that they load once)
from rdlm import cli

if __name__ == "__main__":
    cli.restart_with_huge_pages()

import dataclasses
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from rdlm import checkpoint, checkpoint_io, metrics, optim, perf, sharding, state as state_lib, steps
from rdlm.data import pipeline
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.eval import heldout, report, training_hook
from rdlm.model import ModelConfig, RecurrentLM


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint."""


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: `config.model` plus the recurrence of `config.recurrence`."""
    fields = dict(config.model.to_dict())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"config.model has unknown field(s) {sorted(unknown)}.")
    backprop = config.recurrence.fixed or config.recurrence.backprop
    return ModelConfig(**fields, mean_recurrence=max(config.recurrence.mean, 1), mean_backprop_depth=max(backprop, 1))


def maybe_initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """`jax.distributed.initialize()` whenever this run has more than one process.

    Explicit flags (e.g. several processes on one host) win; otherwise a Cloud TPU VM, a SLURM job
    with several tasks or `JAX_COORDINATOR_ADDRESS` makes JAX detect the cluster itself.
    """
    # CPU processes exchange collectives through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return
    multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if multi_slurm or _on_cloud_tpu_vm() or "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


def _on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (single- or multi-host): JAX reads the worker list from its metadata server."""
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        return bool(os.environ.get("TPU_WORKER_HOSTNAMES"))
    return bool(running_in_cloud_tpu_vm)


class _SigtermFlag:
    """Set by SIGTERM; multi-process runs use JAX's preemption sync point instead (it owns SIGTERM)."""

    def __init__(self):
        self.received = False
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step.")
        self.received = True

    def should_stop(self, manager, step: int) -> bool:
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.received


def _check_config(config, model_config: ModelConfig, mesh, rules) -> int:
    """Checks what would otherwise fail deep inside JAX; returns the per-process batch size."""
    if config.train.num_steps < 0:
        raise ValueError(f"train.num_steps={config.train.num_steps} must be >= 0.")
    accum = config.train.grad_accum_steps
    if accum < 1 or config.train.batch_size % accum:
        raise ValueError(
            f"train.batch_size={config.train.batch_size} must be a multiple of train.grad_accum_steps={accum}."
        )
    sharding.check_batch(config.train.batch_size // accum, mesh, rules, "train.batch_size / train.grad_accum_steps")
    if config.data.seq_len > model_config.block_size:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.block_size={model_config.block_size}.")
    if config.recurrence.mean < 1 and not config.recurrence.fixed:
        raise ValueError(f"recurrence.mean={config.recurrence.mean} must be >= 1.")
    return config.train.batch_size // jax.process_count()


def _global(batch: dict, sharding_, rows: int, accum: int):
    if accum > 1:
        batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        return sharding.global_batch(batch, sharding_, rows // accum, batch_dim=1)
    return sharding.global_batch(batch, sharding_, rows)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains (or resumes) a run in `workdir` on `devices` (default: all); returns the final results."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    workdir = checkpoint_io.as_path(workdir)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _train_and_evaluate(config, workdir, mesh, rules)


def _train_and_evaluate(config, workdir: epath.Path, mesh, rules) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    model_config = model_config_from(config)
    local_batch = _check_config(config, model_config, mesh, rules)
    tokenizer_lib.check_vocab(pipeline.corpus_vocab_size(config), model_config.vocab_size)
    model = RecurrentLM(model_config)
    schedule = optim.make_schedule(config)
    tx = optim.make_optimizer(config, accumulate=False)
    seq_len = config.data.seq_len
    abstract, shardings = state_lib.abstract_state(model, tx, mesh, rules, seq_len)

    ckpts = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    rng = jax.random.key(config.train.seed)
    data_iter = pipeline.make_train_iterator(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.train.seed,
        batch_size_per_process=local_batch,
    )
    _save_tokenizer(config, workdir)
    start = ckpts.latest_step()
    if start is not None:
        state, iter_state = ckpts.restore(start, abstract, shardings)
        data_iter.set_state(iter_state)
        logging.info("Resumed from %s at step %d.", ckpts.directory, start)
    elif config.init_from:
        _, params = checkpoint_io.load_params(config.init_from, shardings=shardings.params)
        state = state_lib.state_from_params(params, tx, shardings)
        logging.info("Initialised params from %s.", config.init_from)
    else:
        state = state_lib.init_state(model, tx, jax.random.fold_in(rng, 2), mesh, rules, seq_len, shardings)
    first_step = int(jax.device_get(state.step))

    accum = config.train.grad_accum_steps
    batch_sharding = sharding.batch_sharding(mesh, rules, leading_dims=1 if accum > 1 else 0)
    train_step = jax.jit(
        steps.make_train_step(model, tx, schedule, config.recurrence, rng, accum),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(steps.make_eval_step(model, config.eval.init_scale), out_shardings=sharding.replicated(mesh))
    eval_batches, task_hook = None, None

    primary = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir, is_primary=primary, resume_step=first_step if first_step else None)
    peak = config.log.peak_tflops or perf.measure_peak_tflops()
    tokens_per_step = config.train.batch_size * seq_len
    progress = metrics.ProgressBar(config.train.num_steps, tokens_per_step=tokens_per_step) if primary else None
    stop = _SigtermFlag()
    config_json = config.to_dict()
    budget_s = config.train.time_budget_minutes * 60
    logging.info(
        "Training %s from step %d to %d on mesh %s.", model_config, first_step, config.train.num_steps, dict(mesh.shape)
    )

    pending, last_time, started = None, time.perf_counter(), time.perf_counter()

    def log_pending():
        nonlocal pending, last_time
        if pending is not None:
            last_time = _log(writer, progress, pending, config, model_config, peak, last_time, tokens_per_step)
            pending = None

    def save(step_state):
        # A checkpoint covers its steps' metrics: a run resumed from it never logs them again.
        log_pending()
        writer.flush()
        ckpts.save(step_state, data_iter.get_state(), _json_safe(config_json), model_config)

    step = first_step
    while step < config.train.num_steps:
        batch = _global(next(data_iter), batch_sharding, config.train.batch_size, accum)
        state, step_metrics = train_step(state, batch)
        step += 1
        log_pending()  # fetched one step late: the device never waits for the host
        pending = (step, step_metrics) if step % config.log.every_steps == 0 or step == config.train.num_steps else None
        if config.eval.every_steps and step % config.eval.every_steps == 0:
            eval_batches = eval_batches or heldout.eval_batches(config, mesh, rules)
            writer.write(
                step,
                heldout.validation_loss(
                    eval_step, state.params, eval_batches, config.eval.num_steps, config.eval.seed
                ),
            )
            if config.eval.tasks:  # shipped or JSONL tasks into metrics.jsonl and TensorBoard
                task_hook = task_hook or training_hook.TaskHook(config, model_config, mesh, rules)
                writer.write(step, task_hook(state.params))
        out_of_time = budget_s and time.perf_counter() - started > budget_s
        if step % config.checkpoint.every_steps == 0 or out_of_time:
            save(state)
        if stop.should_stop(ckpts.manager, step):
            save(state)
            ckpts.wait()
            writer.close()
            raise Preempted(f"Stopped by SIGTERM at step {step}; the checkpoint is saved, rerun to resume.")
        if out_of_time:
            logging.warning("train.time_budget_minutes=%s reached at step %d.", config.train.time_budget_minutes, step)
            break
    log_pending()
    if progress:
        progress.close()
    save(state)
    ckpts.wait()

    result = {}
    if config.eval.final_num_steps:
        eval_batches = eval_batches or heldout.eval_batches(config, mesh, rules)
        result = heldout.recurrence_scaling(config, model, state.params, mesh, rules, eval_batches, eval_step)
        report.write_results(workdir, result)
        if primary:
            print(report.format_table(result), flush=True)
            print(f"Wrote {workdir / report.SCALING_JSON} and {workdir / report.SCALING_PNG}", flush=True)
    writer.close()
    ckpts.close()
    return result


TOKENIZER_FILE = "tokenizer.model"


def _save_tokenizer(config, workdir: epath.Path) -> None:
    """Copies the run's SentencePiece model to WORKDIR/tokenizer.model, where rdlm.generate finds it."""
    tokenizer = pipeline.load_tokenizer(config)
    path = workdir / TOKENIZER_FILE
    if tokenizer is not None and jax.process_index() == 0 and not path.exists():
        path.write_bytes(tokenizer.model_proto)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _log(writer, progress, pending, config, model_config, peak, last_time, tokens_per_step) -> float:
    step, values = pending
    values = {k: float(v) for k, v in jax.device_get(values).items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"The loss became {values['loss']} at step {step}; lower optim.lr or check the data.")
    now = time.perf_counter()
    n = int(values["num_steps_no_grad"])
    k = int(values["num_steps"]) - n
    flops = metrics.model_flops_per_token(model_config, config.data.seq_len, n, k) * tokens_per_step
    every = max(1, config.log.every_steps)
    seconds = (now - last_time) / every
    values.update(step_seconds=seconds, tokens_per_second=tokens_per_step / seconds)
    values["mfu"] = flops / seconds / (peak * 1e12 * jax.device_count())
    writer.write(step, values)
    if progress:
        progress.update(step, loss=values["loss"])
    return now


FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/tiny.py.", lock_config=True, flag_values=FLAGS
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (local path or gs://): checkpoints, metrics, results.", flag_values=FLAGS
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    "",
    "host:port of process 0 for a multi-process run (else auto-detected).",
    flag_values=FLAGS,
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 0, "Processes in a multi-process run (with --coordinator_address).", flag_values=FLAGS
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", -1, "This process's index (with --coordinator_address).", flag_values=FLAGS
)


def main(argv):
    del argv
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Preempted as e:
        logging.warning("%s", e)
        sys.exit(0)


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"config": "configs/tiny.py", "workdir": "runs/tiny"})
