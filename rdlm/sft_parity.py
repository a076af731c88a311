"""Fine-tuning evidence: chat SFT of a run on its own problems, and test-time scaling before and after.

    python -m rdlm.sft_parity --base=runs/tiny_window --workdir=runs/tiny_sft [--num_steps=200]

It writes the base run's built-in problems (rdlm.data.tasks) as chat conversations, a user turn holding the
problem and an assistant turn holding the problem again, then the answer (`--assistant_restates`; only the
answer with --noassistant_restates): training ones at the base run's training difficulties, and
held-out ones the base run's own held-out problems (those of its final table; their prompts are dropped
from the training set). It prepares both as chat shards with the base run's tokenizer (python -m rdlm.data.prepare
--format=chat), fine-tunes the base with configs/sft.py (randomized depth, truncated backprop, assistant tokens
only), and scores the base and the fine-tuned model at each r with rdlm.eval's runner: validation loss on the
held-out conversations (`val`) and held-out accuracy as multiple choice through the chat template, within and
beyond the training difficulties. WORKDIR/sft_parity.json holds both tables.
"""

import collections
import dataclasses
import json

from absl import flags

from rdlm import cli, storage

FLAGS = flags.FlagValues()
_BASE = flags.DEFINE_string("base", None, "The rdlm workdir to fine-tune (trained on the built-in problems).",
                            flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of the fine-tune; its data/ holds the chat sets.",
                               flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("num_steps", 200, "Fine-tuning steps.", flag_values=FLAGS)
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate of the fine-tune.", flag_values=FLAGS)
_TRAIN = flags.DEFINE_integer("train_conversations", 20000, "Training conversations.", flag_values=FLAGS)
_R = flags.DEFINE_list("eval_num_steps", ["1", "2", "4", "8", "16", "32"], "Test-time r to score.",
                       flag_values=FLAGS)
_RESTATE = flags.DEFINE_bool(
    "assistant_restates", True, "The assistant's turn repeats the problem before its answer ('0110=0'), so the answer "
    "follows the bits as in pre-training; without it the template's header tokens sit between them, which a model "
    "with a 2-token attention window (configs/tiny.py) cannot see across.", flag_values=FLAGS)
_HELDOUT = flags.DEFINE_integer("heldout_problems", 256, "Held-out problems per task (an even spread of the base "
                                "run's own; 0: all of them).", flag_values=FLAGS)


def _conversation(problem, restate: bool) -> dict:
    answer = problem.prompt + problem.answer if restate else problem.answer
    return {"messages": [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path, rows) -> None:
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _drop_heldout(problems: list, heldout: list) -> list:
    """Drops training problems whose prompt is held out, except at difficulties too small to separate (the rule
    of the built-in corpus: where held-out prompts are over half of the problems, e.g. 2-bit parity)."""
    seen = {p.prompt for p in heldout}
    total, clash = collections.Counter(), collections.Counter()
    for p in problems:
        total[p.difficulty] += 1
        clash[p.difficulty] += p.prompt in seen
    return [p for p in problems if 2 * clash[p.difficulty] > total[p.difficulty] or p.prompt not in seen]


def _spread(problems: list, n: int) -> list:
    """`n` of `problems` evenly spaced (all when n is 0 or covers them)."""
    if not n or n >= len(problems):
        return problems
    return [problems[i * len(problems) // n] for i in range(n)]


def write_chat_sets(base_config, out, train_conversations: int, heldout_problems: int = 0,
                    restate: bool = True) -> dict:
    """Writes train.jsonl, heldout.jsonl and a multiple-choice chat task per difficulty range into `out`.

    The held-out problems are the base run's own (those of its final table, which its training never saw).
    """
    from rdlm.data import builtin, tasks

    spec = builtin.BuiltinSpec.from_config(base_config.data)
    heldout = builtin.heldout_problems(base_config.data)
    trained = set(spec.difficulties)
    train = []
    for task in heldout:
        problems = tasks.generate(task, train_conversations // len(heldout), seed=spec.seed + 17,
                                  difficulties=spec.difficulties)
        train += _drop_heldout(problems, heldout[task])
    heldout = {task: _spread(problems, heldout_problems) for task, problems in heldout.items()}
    out = storage.makedirs(out)
    _write_jsonl(out / "train.jsonl", [_conversation(p, restate) for p in train])
    _write_jsonl(out / "heldout.jsonl", [_conversation(p, restate) for ps in heldout.values() for p in ps])
    task_specs = []
    for task, problems in heldout.items():
        answers = sorted({p.answer for p in problems})
        for inside in (True, False):
            chosen = [p for p in problems if (p.difficulty in trained) == inside]
            if not chosen:
                continue
            lo, hi = min(p.difficulty for p in chosen), max(p.difficulty for p in chosen)
            name = f"chat-{task}-{lo}-{hi}{'' if inside else '-beyond'}"
            rows = [{"context": p.prompt, "choices": [p.prompt + a if restate else a for a in answers],
                     "label": answers.index(p.answer)} for p in chosen]
            _write_jsonl(out / f"{name}.jsonl", rows)
            storage.write_text(out / f"{name}.json", json.dumps(
                {"name": name, "type": "multiple_choice", "data": f"{name}.jsonl", "target_delimiter": "",
                 "chat": True}))
            task_specs.append(str(out / f"{name}.json"))
    return {"train": len(train), "heldout": sum(len(ps) for ps in heldout.values()), "tasks": task_specs}


def sft_config(base: str, data_dir, num_steps: int, lr: float):
    from configs import sft

    c = sft.get_config(base)
    c.data.paths = str(storage.path(data_dir) / "train" / "*.array_record")
    c.data.eval_paths = str(storage.path(data_dir) / "heldout" / "*.array_record")
    c.train.num_steps = num_steps
    c.optim.lr = lr
    c.optim.warmup_steps = max(1, num_steps // 10)
    c.checkpoint.every_steps = max(1, num_steps // 4)
    c.eval.every_steps = 0
    c.eval.final_num_steps = ()  # scored below, before and after, by the same runner
    c.eval.batch_size = 64
    c.data.eval_batches = 8
    return c


def score(model, config, num_steps, task_specs) -> dict:
    """The runner's `val` (on the held-out conversations) and chat tasks, for a model under the fine-tune's config."""
    from rdlm.eval import runner

    model = dataclasses.replace(model, run_config=config)
    return runner.evaluate(model, num_steps=num_steps, tasks=["val", *task_specs], batch_size=64)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; flags look like --base=runs/tiny_window.")
    if not _BASE.value or not _WORKDIR.value:
        cli.fail("--base and --workdir are required, e.g. --base=runs/tiny_window --workdir=runs/tiny_sft.")
    import ml_collections

    from rdlm import checkpoint_io
    from rdlm.data import prepare
    from rdlm.eval import report, runner
    from rdlm.train import train_and_evaluate

    run = checkpoint_io.read_run_config(_BASE.value)
    if run is None or run["data"]["source"] != "builtin":
        raise ValueError(f"--base={_BASE.value} is not a training workdir on the built-in data.")
    base_config = ml_collections.ConfigDict(run)
    workdir = storage.path(_WORKDIR.value)
    data = workdir / "data"
    sets = write_chat_sets(base_config, data, _TRAIN.value, _HELDOUT.value, _RESTATE.value)
    tokenizer = str(storage.path(_BASE.value) / "tokenizer.model")
    for split in ("train", "heldout"):  # rewritten on every run: the same flags give the same shards
        prepare.prepare_chat(str(data / f"{split}.jsonl"), str(data / split), tokenizer=tokenizer)
    config = sft_config(_BASE.value, data, _STEPS.value, _LR.value)
    num_steps = [int(r) for r in _R.value]
    before = score(runner.load_model(_BASE.value), config, num_steps, sets["tasks"])
    train_and_evaluate(config, str(workdir))
    after = score(runner.load_model(str(workdir)), config, num_steps, sets["tasks"])
    storage.write_text(workdir / "sft_parity.json", json.dumps({"sets": sets, "before": before, "after": after}, indent=2))
    print(f"{sets['train']} training and {sets['heldout']} held-out conversations; {_STEPS.value} fine-tuning steps.")
    print("Before fine-tuning (the base model):\n" + report.format_table(before), flush=True)
    print("After fine-tuning:\n" + report.format_table(after), flush=True)
    print(f"Wrote {workdir / 'sft_parity.json'}")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__)
