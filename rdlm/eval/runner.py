"""The runner: load a checkpoint once, then score every task at every r.

    model = load_model("runs/tiny")                          # workdir, Orbax step directory or HF directory
    result = evaluate(model, num_steps=(1, 4, 16, 32, 64), tasks=default_tasks(model))

Task names: `val` (validation loss, perplexity and bits per byte on the run's own validation data),
`builtin` (held-out reasoning accuracy of a run on the built-in data), a shipped task
(`rdlm.eval.tasks.shipped_names()`), a task spec (.json) or a JSONL file.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from rdlm import checkpoint_io, sharding, state as state_lib, storage
from rdlm.data import tokenizer as tokenizer_lib
from rdlm.eval import heldout, scoring, tasks as tasks_lib
from rdlm.eval.engine import Engine
from rdlm.model import RecurrentLM
from rdlm.model.config import ModelConfig
from rdlm.sampling import parse_exit
from rdlm.sampling.text import TextCodec, load_codec, tokenizer_path

RUN_TASKS = ("val", "builtin")


@dataclasses.dataclass
class LoadedModel:
    """A checkpoint on a mesh: its config, params, tokenizer and (for training runs) the run's config."""

    checkpoint: str
    config: ModelConfig
    params: object
    codec: TextCodec
    mesh: object
    rules: tuple
    run_config: ml_collections.ConfigDict | None
    tokenizer: tokenizer_lib.Tokenizer | None  # the run's saved SentencePiece model, if it has one

    def engine(self, *, batch_size: int = 16, init_scale: float | None = None, seed: int | None = None,
               max_steps: int = 1) -> Engine:
        return Engine(self.config, self.params, self.codec, mesh=self.mesh, rules=self.rules, batch_size=batch_size,
                      init_scale=self.init_scale if init_scale is None else init_scale,
                      seed=self.seed if seed is None else seed, max_steps=max_steps)

    def generate(self, prompt: str, *, num_steps: int = 32, exit: str = "", max_new_tokens: int = 32,
                 chat: bool = False, init_scale: float | None = None, seed: int = 0) -> tuple[str, list[int]]:
        """Greedy text after `prompt` (huginn's chat template with `chat`) and the iterations of each new token."""
        from rdlm import sampling

        criterion = parse_exit(exit) if exit else None
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            out = sampling.generate(
                self.config, self.params, [self.codec.prompt_ids(prompt, chat=chat)], max_new_tokens=max_new_tokens,
                num_steps=num_steps, stop_tokens=self.codec.stop_ids, pad_id=self.codec.pad_id,
                init_scale=self.init_scale if init_scale is None else init_scale, rng=jax.random.key(seed),
                exit_criterion=criterion and criterion.name, exit_threshold=criterion and criterion.threshold)
        new = out.new_tokens()[0]
        return self.codec.decode(new), [int(s) for s in np.asarray(out.steps_per_token)[0][:len(new)]]

    @property
    def init_scale(self) -> float:
        """The run's evaluation init_scale, else the reference's default (1.0: a random initial state)."""
        return float(self.run_config.eval.init_scale) if self.run_config else 1.0

    @property
    def seed(self) -> int:
        return int(self.run_config.eval.seed) if self.run_config else 0


def eval_mesh(devices=None):
    """Parameters FSDP-sharded over every device, the batch split over all of them."""
    mesh_config = ml_collections.ConfigDict(dict(shape=(1, -1, 1), axis_names=sharding.AXIS_NAMES, dcn_shape=(1, 1, 1)))
    mesh = sharding.make_mesh(mesh_config, devices)
    return mesh, sharding.check_rules(sharding.DEFAULT_RULES, mesh)


def load_model(checkpoint: str, *, dtype: str | None = None, tokenizer: str | None = None, devices=None) -> LoadedModel:
    """Loads `checkpoint` (a training workdir, an Orbax step directory or a HF directory; local or gs://).

    The tokenizer is the checkpoint's own (a run's saved WORKDIR/tokenizer.model), never one rebuilt
    from the built-in corpus; `tokenizer` overrides it. `dtype` sets the compute dtype (e.g. bfloat16).
    """
    config = checkpoint_io.model_config_of(checkpoint)
    if dtype:
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} must be float32 or bfloat16.")
        config = dataclasses.replace(config, dtype=dtype)
    mesh, rules = eval_mesh(devices)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = state_lib.param_shardings(RecurrentLM(config), mesh, rules)
        _, params = checkpoint_io.load_params(checkpoint, shardings=shardings)
    codec = load_codec(checkpoint, tokenizer)
    path = storage.path(tokenizer) if tokenizer else tokenizer_path(checkpoint)
    saved = tokenizer_lib.Tokenizer(path.read_bytes()) if path.suffix == ".model" else None
    run = checkpoint_io.read_run_config(checkpoint)
    run_config = ml_collections.ConfigDict(run) if run else None
    return LoadedModel(str(checkpoint), config, params, codec, mesh, rules, run_config, saved)


def default_tasks(model: LoadedModel) -> list[str]:
    """The run's own checks where it has them, then every shipped task."""
    names = []
    if model.run_config is not None and model.tokenizer is not None:
        names.append("val")
        if heldout.has_reasoning(model.run_config):
            names.append("builtin")
    return names + tasks_lib.shipped_names()


def split_tasks(names) -> tuple[list[str], list[tasks_lib.Task]]:
    """(run tasks among `names`, the other names loaded as tasks); an unknown name is one sentence."""
    names = [n.strip() for n in names if n.strip()]
    return [n for n in names if n in RUN_TASKS], [tasks_lib.load(n) for n in names if n not in RUN_TASKS]


def score_tasks(engine: Engine, task_list, num_steps: int, exit=None) -> dict[str, dict[str, float]]:
    """{task: {metric: score, "mean_iterations": iterations per scored or generated token}} at one r."""
    out = {}
    chat_text = engine.codec.chat_text if engine.codec.chat_template else None
    for task in task_list:
        if task.kind == tasks_lib.MULTIPLE_CHOICE:
            scored = engine.loglikelihood(task.choice_requests(chat_text), num_steps, exit)
            per_doc, start = [], 0
            for doc in task.docs:
                lls = scored.loglikelihood[start:start + len(doc.choices)]
                per_doc.append(scoring.choice_scores(lls, doc.choices, doc.label))
                start += len(doc.choices)
            steps = scored.steps
        else:
            gen = engine.generate([task.generation_context(d, chat_text) for d in task.docs], until=task.until,
                                  max_gen_toks=task.max_gen_toks, num_steps=num_steps, exit=exit)
            pattern = scoring.STRICT_PATTERNS[task.strict]
            per_doc = [scoring.generation_scores(text, d.answer, pattern) for text, d in zip(gen.text, task.docs)]
            steps = gen.steps
        scores = {m: float(np.mean([s[m] for s in per_doc])) for m in task.metrics}
        flat = [s for row in steps for s in row]
        scores["mean_iterations"] = float(np.mean(flat)) if flat else float("nan")
        out[task.name] = scores
    return out


def _run_scores(model: LoadedModel, which, num_steps, exit, engine) -> dict:
    """val and/or builtin at every r, through the same code as training's final table."""
    if model.run_config is None or model.tokenizer is None:
        raise ValueError(f"Tasks {list(which)} need a training run (its config and tokenizer.model); "
                         f"{model.checkpoint} has none, so pass other --tasks.")
    config = ml_collections.ConfigDict(model.run_config.to_dict())
    config.eval.final_num_steps = tuple(num_steps)
    if "builtin" in which and not heldout.has_reasoning(config):
        raise ValueError(f"Task 'builtin' needs a run trained on the built-in problems; {model.checkpoint} is not one.")
    config.eval.reasoning = "builtin" in which and exit is None  # with an exit it is scored below instead
    rlm = RecurrentLM(model.config)
    with jax.set_mesh(model.mesh), nn.logical_axis_rules(model.rules):
        batches = heldout.eval_batches(config, model.mesh, model.rules, model.tokenizer)
        result = heldout.recurrence_scaling(config, rlm, model.params, model.mesh, model.rules, batches,
                                            tokenizer=model.tokenizer)
    del result["num_steps"]
    if "val" in which:
        weights, nbytes = heldout.target_bytes(batches, model.tokenizer)
        result["val_perplexity"] = [math.exp(x) for x in result["val_loss"]]
        result["val_bits_per_byte"] = [scoring.bits_per_byte(x * weights, nbytes) for x in result["val_loss"]]
    else:
        del result["val_loss"]
    if exit is not None and "builtin" in which:  # exact match with the exit, token by token through the cache
        rows = heldout.reasoning_requests(config, model.tokenizer)
        accuracy, iterations = [], []
        for r in num_steps:
            scored = engine.loglikelihood_tokens(rows, r, exit)
            accuracy.append(float(np.mean(scored.greedy)))
            iterations.append(float(np.mean([s for row in scored.steps for s in row])))
        result = {k: v for k, v in result.items() if not k.startswith("accuracy")}
        result.update(accuracy=accuracy, accuracy_mean_iterations=iterations)
    return result


def evaluate(model: LoadedModel, *, num_steps, tasks=None, exit: str = "", batch_size: int = 16,
             init_scale: float | None = None, seed: int | None = None) -> dict:
    """Scores `tasks` (default: default_tasks) at each r of `num_steps`; see rdlm.eval.report for the layout."""
    num_steps = [int(r) for r in num_steps]
    if not num_steps or min(num_steps) < 1:
        raise ValueError(f"num_steps={num_steps} must be one or more ints >= 1.")
    criterion = parse_exit(exit) if exit else None
    which, task_list = split_tasks(default_tasks(model) if tasks is None else tasks)
    engine = model.engine(batch_size=batch_size, init_scale=init_scale, seed=seed, max_steps=max(num_steps))
    result = {"checkpoint": model.checkpoint, "num_steps": num_steps, "exit": exit or None}
    if which:
        result.update(_run_scores(model, which, num_steps, criterion, engine))
    per_r = [score_tasks(engine, task_list, r, criterion) for r in num_steps]
    result["tasks"] = {}
    for task in task_list:
        metrics = list(task.metrics) + (["mean_iterations"] if criterion else [])
        result["tasks"][task.name] = {m: [scores[task.name][m] for scores in per_r] for m in metrics}
    return result
