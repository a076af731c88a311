"""Regenerates the shipped tasks (rdlm/eval/data) from the built-in problems of rdlm.data.tasks.

    python -m rdlm.eval.make_tasks [--tasks=parity] [--num=512] [--difficulties=1-32] [--out=rdlm/eval/data]

For each task it writes `<task>-choice` (multiple choice: the prompt as context, every answer the task
can give as a choice) and `<task>-answer` (generation: the prompt as question, scored by GSM8K's
rules), each a JSONL file and a spec. The problems are the built-in held-out ones (the seed of
data.builtin.seed = 0, the held-out offset), so training on the built-in data never sees their prompts
at difficulties large enough to hold out.
"""

import json

from absl import flags
from etils import epath

from rdlm import cli

FLAGS = flags.FlagValues()
_TASKS = flags.DEFINE_list("tasks", ["parity"], "Tasks of rdlm.data.tasks to ship.", flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num", 512, "Problems per task.", flag_values=FLAGS)
_DIFFICULTIES = flags.DEFINE_string("difficulties", "1-32", "Difficulty range lo-hi.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", str(epath.Path(__file__).parent / "data"), "Output directory.", flag_values=FLAGS)
_MAX_CHOICES = 10  # a task with more distinct answers gets no multiple-choice version


def problems(task: str, num: int, difficulties) -> list:
    from rdlm.data import builtin
    from rdlm.data import config as data_config

    cfg = data_config.get_config()
    cfg.builtin.tasks = task
    cfg.builtin.heldout_difficulties = tuple(difficulties)
    cfg.builtin.heldout_problems = num
    return builtin.heldout_problems(cfg)[task]


def write_task(out: epath.Path, task: str, items: list) -> list[str]:
    """Writes the task's -choice and -answer files; returns the names written."""
    names = []
    answers = sorted({p.answer for p in items})
    if len(answers) <= _MAX_CHOICES:
        name = f"{task}-choice"
        rows = [{"context": p.prompt, "choices": answers, "label": answers.index(p.answer), "difficulty": p.difficulty}
                for p in items]
        _write(out, name, rows, {"name": name, "type": "multiple_choice", "data": f"{name}.jsonl",
                                 "target_delimiter": ""})
        names.append(name)
    name = f"{task}-answer"
    rows = [{"question": p.prompt, "answer": p.answer, "difficulty": p.difficulty} for p in items]
    longest = max(len(p.answer) for p in items)
    _write(out, name, rows, {"name": name, "type": "generate_until", "data": f"{name}.jsonl", "prompt": "{{question}}",
                             "until": ["\n"], "max_gen_toks": max(4, longest + 2), "strict": "gsm8k"})
    return names + [name]


def _write(out: epath.Path, name: str, rows: list, spec: dict) -> None:
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}.")
    lo, _, hi = _DIFFICULTIES.value.partition("-")
    try:
        difficulties = range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"--difficulties={_DIFFICULTIES.value!r} must look like 1-32.") from None
    out = epath.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    for task in _TASKS.value:
        for name in write_task(out, task, problems(task, _NUM.value, difficulties)):
            print(f"wrote {out / name}.jsonl and {name}.json")


if __name__ == "__main__":
    cli.run(main, FLAGS, usage=__doc__)
