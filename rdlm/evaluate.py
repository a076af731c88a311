"""Evaluate a checkpoint against the number of test-time iterations r.

    python -m rdlm.evaluate --checkpoint=CKPT --num_steps=1,4,8,16,32,64 [--tasks=val,builtin,parity-choice]
        [--exit=kl:5e-4] [--out=DIR] [--batch_size=16] [--dtype=bfloat16]

CKPT is a training workdir (its newest complete step), an Orbax step directory or a Hugging Face
directory, local or gs://. For each r it prints and writes (DIR/results.json, DIR/results.png):
validation loss, perplexity and bits per byte (`val`), held-out reasoning accuracy (`builtin`),
multiple-choice acc / acc_norm and generation strict-match / flexible-extract, as lm-eval scores
them; with --exit also the mean core iterations per token. The default tasks are the run's own
(`val`, `builtin`) and every shipped task (rdlm/eval/data). The evaluation code lives in rdlm/eval/.

    python -m rdlm.evaluate --tasks=parity-choice,parity-answer --write_lm_eval_tasks=DIR

writes those tasks as lm-eval task YAMLs (for `rdlm-lm-eval run --model rdlm --include_path DIR`).
"""

from absl import flags

from rdlm import cli

FLAGS = flags.FlagValues()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, Orbax step directory or HF directory.",
                                  flag_values=FLAGS)
_NUM_STEPS = flags.DEFINE_list("num_steps", ["1", "4", "8", "16", "32", "64"], "Test-time iterations r to compare.",
                               flag_values=FLAGS)
_TASKS = flags.DEFINE_list("tasks", [], "Task names, spec files (.json) or JSONL files; default: the run's own "
                           "(val, builtin) and every shipped task.", flag_values=FLAGS)
_EXIT = flags.DEFINE_string("exit", "", "Adaptive exit 'criterion[:threshold]', e.g. kl:5e-4; '' = fixed depth.",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "", "Output directory; default WORKDIR/eval for a workdir, else ./eval.",
                           flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Requests per batch (rounded up to a multiple of the devices).",
                              flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Compute dtype; '' = the checkpoint's.",
                           flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer file overriding the checkpoint's (.model or .json).",
                                 flag_values=FLAGS)
_INIT_SCALE = flags.DEFINE_float("init_scale", -1.0, "Initial-state scale; -1 = the run's eval.init_scale (else 1).",
                                 flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", -1, "Seed of the initial states; -1 = the run's eval.seed (else 0).",
                             flag_values=FLAGS)
_WRITE_YAML = flags.DEFINE_string("write_lm_eval_tasks", "", "Write --tasks as lm-eval task YAMLs into this "
                                  "directory and exit.", flag_values=FLAGS)


def _num_steps(values) -> list[int]:
    try:
        steps = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--num_steps={','.join(values)} must be comma-separated ints, e.g. 1,4,16,32.") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--num_steps={','.join(values)} must list iterations >= 1.")
    return steps


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags look like --checkpoint=DIR.")
    from rdlm import checkpoint_io, storage
    from rdlm.eval import report, runner, tasks

    if _WRITE_YAML.value:
        out = storage.path(_WRITE_YAML.value)
        out.mkdir(parents=True, exist_ok=True)
        for name in _TASKS.value or tasks.shipped_names():
            task = tasks.load(name)
            (out / f"{task.name}.yaml").write_text(tasks.lm_eval_yaml(task))
            print(f"wrote {out / (task.name + '.yaml')}")
        return
    if not _CHECKPOINT.value:
        cli.fail("--checkpoint is required, e.g. --checkpoint=runs/tiny.")
    num_steps = _num_steps(_NUM_STEPS.value)
    model = runner.load_model(_CHECKPOINT.value, dtype=_DTYPE.value or None, tokenizer=_TOKENIZER.value or None)
    result = runner.evaluate(
        model, num_steps=num_steps, tasks=_TASKS.value or None, exit=_EXIT.value, batch_size=_BATCH.value,
        init_scale=None if _INIT_SCALE.value < 0 else _INIT_SCALE.value, seed=None if _SEED.value < 0 else _SEED.value,
    )
    out = _OUT.value or ("eval" if checkpoint_io.kind_of(_CHECKPOINT.value) != "workdir" else
                         str(storage.path(_CHECKPOINT.value) / "eval"))
    report.write_results(out, result, report.RESULTS_JSON, report.RESULTS_PNG)
    print(report.format_table(result), flush=True)
    print(f"Wrote {storage.path(out) / report.RESULTS_JSON} and {storage.path(out) / report.RESULTS_PNG}")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__)
