"""Training: `python -m rdlm.train --config=configs/tiny.py --workdir=runs/tiny`.

`train_and_evaluate(config, workdir)` resumes from the workdir's newest intact checkpoint (model,
optimizer and data-iterator state; a corrupt newer one is named and passed over, rdlm.checkpoint),
trains to `train.num_steps`, saving every `checkpoint.every_steps`, on SIGTERM and before the job's
time limit (`train.max_hours`, rdlm.preemption), and ends with the recurrence-scaling table: held-out
accuracy and validation loss against test-time r. A resumed run reads its data with its own saved
tokenizer (WORKDIR/tokenizer.model) and refuses a built-in corpus whose fingerprint has changed.
The workdir is checked before anything is compiled (rdlm.workdir); a non-finite step applies no
update and is skipped or stops the run (`train.on_nonfinite`, rdlm.numerics).

`--dry_run` compiles the train step from abstract shapes on the devices present and prints its
memory per device and micro-batch layout as one JSON line (rdlm.program.dry_run); nothing is
allocated, read or written.
"""

# ruff: noqa: E402 (the huge-pages restart runs before the heavy imports, so that they load once)
from rdlm import cli

if __name__ == "__main__":
    cli.restart_with_huge_pages()

import json
import os
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from ml_collections import config_flags

from rdlm import checkpoint, checkpoint_io, fault_hooks, metrics, numerics, perf, preemption, sharding
from rdlm import state as state_lib
from rdlm import steps, storage, train_log
from rdlm import workdir as workdir_lib
from rdlm import program as program_lib
from rdlm.data import chat, pipeline
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.eval import heldout, report, training_hook


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


def _global(batch: dict, sharding_, rows: int, accum: int):
    if accum > 1:
        batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
        return sharding.global_batch(batch, sharding_, rows // accum, batch_dim=1)
    return sharding.global_batch(batch, sharding_, rows)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Trains (or resumes) a run in `workdir` on `devices` (default: all); returns the final results."""
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh.rules, mesh)
    workdir = storage.path(workdir)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return _train_and_evaluate(config, workdir, mesh, rules)


def _train_and_evaluate(config, workdir: epath.Path, mesh, rules) -> dict:
    program = program_lib.build(config, mesh, rules)
    model_config, model, tx, micro = program.model_config, program.model, program.tx, program.micro
    abstract, shardings = program.abstract, program.shardings
    logging.info("%s", micro.describe())
    numerics.check_config(config.train)
    stop = preemption.StopSignals(config.train)  # the job's clock starts here
    workdir_lib.check_writable(workdir)  # before any data is built or anything compiled
    workdir_lib.check_free_space(workdir, workdir_lib.state_bytes(abstract), config.checkpoint.keep)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    resuming = bool(ckpts.steps())
    config_json = config.to_dict()  # each checkpoint records the config as given
    config = _with_run_tokenizer(config, workdir) if resuming else config
    tokenizer_lib.check_vocab(pipeline.corpus_vocab_size(config), model_config.vocab_size)
    corpus = _corpus(config)
    if not resuming:
        _save_tokenizer(config, workdir)

    seq_len = config.data.seq_len
    rng = jax.random.key(config.train.seed)
    restored = ckpts.restore_latest(abstract, shardings) if resuming else None
    if restored is not None:
        _check_same_corpus(ckpts, restored[0], corpus)
    data_iter = pipeline.make_train_iterator(
        config,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.train.seed,
        batch_size_per_process=config.train.batch_size // jax.process_count(),
    )
    if restored is not None:
        start, state, iter_state = restored
        data_iter.set_state(iter_state)
        logging.info("Resumed from %s at step %d.", ckpts.directory, start)
    elif config.init_from:
        checkpoint_io.check_same_shape(config.init_from, model_config)
        _, params = checkpoint_io.load_params(config.init_from, shardings=shardings.params)
        if not bool(numerics.all_finite(params)):
            raise ValueError(f"init_from={config.init_from} holds non-finite parameters; start from another checkpoint.")
        state = state_lib.state_from_params(params, tx, shardings)
        logging.info("Initialised params from %s.", config.init_from)
    else:
        state = state_lib.init_state(model, tx, jax.random.fold_in(rng, 2), mesh, rules, seq_len, shardings)
    first_step = int(jax.device_get(state.step))

    accum, batch_sharding, train_step = micro.grad_accum_steps, program.batch_sharding, program.train_step
    train_key = program.key(config.train.seed)
    eval_step = jax.jit(steps.make_eval_step(model, config.eval.init_scale), out_shardings=sharding.replicated(mesh))
    eval_batches, task_hook = None, None

    primary = jax.process_index() == 0
    writer = metrics.MetricsWriter(workdir, is_primary=primary, resume_step=first_step if first_step else None)
    peak = config.log.peak_tflops or perf.measure_peak_tflops()
    tokens_per_step = config.train.batch_size * seq_len
    progress = metrics.ProgressBar(config.train.num_steps, tokens_per_step=tokens_per_step) if primary else None
    reporter = train_log.StepReporter(config, model_config, writer, workdir, progress=progress, peak_tflops=peak,
                                     process_index=jax.process_index())
    budget_s = config.train.time_budget_minutes * 60
    logging.info(
        "Training %s from step %d to %d on mesh %s.", model_config, first_step, config.train.num_steps, dict(mesh.shape)
    )

    started = time.perf_counter()

    def save(step_state):
        # A checkpoint covers its steps' metrics: a run resumed from it never logs them again.
        reporter.finish()
        writer.flush()
        ckpts.save(step_state, data_iter.get_state(), _json_safe(config_json), model_config, corpus)

    def save_and_leave(message: str):
        save(state)
        ckpts.wait()
        writer.close()
        raise preemption.Preempted(message)

    try:
        step = first_step
        while step < config.train.num_steps:
            data_state = data_iter.get_state()  # where this step's batch starts, for the non-finite guard's message
            batch = dict(next(data_iter))
            bad_records = int(np.sum(batch.pop(pipeline.BAD_RECORDS_KEY, 0)))
            batch = _global(fault_hooks.poison_batch(step + 1, batch), batch_sharding, config.train.batch_size, accum)
            state, step_metrics = train_step(state, batch, train_key)
            step += 1
            reporter.add(step, step_metrics, data_state, bad_records)  # reports the step before: it is done by now
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
            if stop.sigterm(ckpts.manager, step):
                save_and_leave(f"Stopped by SIGTERM at step {step}; the checkpoint is saved, rerun to resume.")
            if stop.out_of_job_time() and step < config.train.num_steps:
                save_and_leave(stop.describe_limit(step))
            if out_of_time:
                logging.warning("train.time_budget_minutes=%s reached at step %d.", config.train.time_budget_minutes,
                                step)
                break
        reporter.finish()
        if progress:
            progress.close()
        save(state)
        ckpts.wait()
    except BaseException:  # the step being written still becomes a checkpoint; Orbax's threads stop
        ckpts.close_after_failure()
        raise

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


TOKENIZER_FILE = checkpoint.TOKENIZER_FILE


def _save_tokenizer(config, workdir: epath.Path) -> None:
    """A starting run keeps its SentencePiece model as WORKDIR/tokenizer.model: the only one its resumes,
    rdlm.generate and evaluation load. A file left by an earlier start that saved no checkpoint is replaced."""
    if jax.process_index() != 0:
        return
    tokenizer = pipeline.load_tokenizer(config)
    path = checkpoint.tokenizer_file(workdir)
    if tokenizer is not None:
        checkpoint.save_run_tokenizer(workdir, tokenizer)
    elif path.exists():
        logging.warning("Removing %s: it was left by an earlier start, and this run has no tokenizer.", path)
        path.unlink()
    source = pipeline.tokenizer_file(config)
    if source and source.endswith(".json"):  # huginn's tokenizer.json (chat shards): generation and export find it
        chat.copy_tokenizer_json(source, workdir)


def _with_run_tokenizer(config, workdir: epath.Path):
    """The config a resumed run reads its data with: `data.tokenizer` is the run's saved tokenizer, if any."""
    path = checkpoint.tokenizer_file(workdir)
    if not path.exists():
        return config  # trained on bare ids
    if config.data.tokenizer and config.data.tokenizer != str(path):
        logging.warning("Resuming with the run's own tokenizer %s, not data.tokenizer=%s.", path, config.data.tokenizer)
    config = config.copy_and_resolve_references()
    config.data.tokenizer = str(path)
    return config


def _corpus(config) -> dict:
    """What a checkpoint records of its data: the source and, for the built-in corpus, its fingerprint."""
    source = config.data.source
    fingerprint = pipeline.builtin_corpus(config).fingerprint if source == "builtin" else None
    return {"source": source, "fingerprint": fingerprint}


def _check_same_corpus(ckpts: checkpoint.Checkpoints, step: int, corpus: dict) -> None:
    """A run resumes only on the built-in corpus it was trained on (another machine may have another stdlib)."""
    saved = ckpts.corpus(step)
    if saved is None:
        logging.warning("Checkpoint %d stores no corpus fingerprint; the corpus cannot be checked.", step)
        return
    if saved["fingerprint"] is None or saved == corpus:
        return
    here = (
        f"here it has fingerprint {corpus['fingerprint']}" if corpus["fingerprint"]
        else f"this config reads data.source={corpus['source']!r}"
    )
    raise ValueError(
        f"Refusing to resume: {ckpts.step_dir(step)} was trained on the built-in corpus with fingerprint "
        f"{saved['fingerprint']}, but {here} (the code files, i.e. this interpreter's stdlib or "
        "data.builtin.code_dir, or the data.builtin settings differ); resume where the corpus is the same, "
        "or start a new --workdir."
    )


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Compile the train step from abstract shapes on the devices present, print its memory per device and "
    "micro-batches as one JSON line, and exit; no data is read, no parameter allocated, nothing written.",
    flag_values=FLAGS,
)


def main(argv):
    del argv
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DRY_RUN.value:
        result = program_lib.dry_run(_CONFIG.value)
        if jax.process_index() == 0:
            print(json.dumps(result), flush=True)
        return
    if _WORKDIR.value is None:
        cli.fail("--workdir is required, e.g. --workdir=runs/tiny.")
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except preemption.Preempted as e:
        logging.warning("%s", e)
        sys.exit(0)
    except OSError as e:
        if not workdir_lib.is_disk_full(e):
            raise
        cli.fail(f"{workdir_lib.describe_disk_full(e)}; free some space and rerun the same command to resume "
                 "from the newest complete checkpoint.")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__, required={"config": "configs/tiny.py"})
