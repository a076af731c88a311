"""What more test-time iterations buy on a run's own data: held-out reasoning accuracy and validation loss.

Accuracy is exact match of the answer under teacher forcing: every answer token must be the
argmax given the prompt and the answer's earlier tokens, which is exactly when greedy decoding
after the prompt produces the answer. Both run one compiled program for every r.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rdlm import sharding, steps
from rdlm.data import builtin, pipeline
from rdlm.model import RecurrentLM


def problem_rows(tokenizer, problems, bos_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, answer_mask) per problem: [BOS] + prompt + answer, the mask on positions predicting the answer."""
    prompts = tokenizer.encode_batch([p.prompt for p in problems])
    answers = tokenizer.encode_batch([p.answer for p in problems])
    rows = []
    for prompt, answer in zip(prompts, answers):
        ids = np.asarray([bos_id] + prompt + answer, np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(prompt) : len(prompt) + len(answer)] = True  # position t predicts ids[t + 1]
        rows.append((ids, mask))
    return rows


def _batch(rows, length: int) -> dict[str, np.ndarray]:
    B = len(rows)
    batch = {k: np.zeros((B, length), np.int32) for k in ("inputs", "targets", "segment_ids")}
    batch["answer_mask"] = np.zeros((B, length), bool)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        batch["inputs"][b, :n], batch["targets"][b, :n] = ids[:-1], ids[1:]
        batch["segment_ids"][b, :n] = 1
        batch["answer_mask"][b, :n] = mask[:-1]
    return batch


class ReasoningEval:
    """Exact-match accuracy of held-out problems at any r, compiled once for every r."""

    def __init__(self, model: RecurrentLM, mesh: Mesh, rules, *, batch_size: int, init_scale: float):
        self.mesh, self.rules, self.batch_size = mesh, rules, batch_size
        sharding.check_batch(batch_size, mesh, rules, "eval.batch_size")

        def correct(params, batch, num_steps, rng):
            out = model.apply(
                {"params": params},
                batch["inputs"],
                num_steps=num_steps,
                segment_ids=batch["segment_ids"],
                init_scale=init_scale,
                rngs={"state": rng},
            )
            right = (jnp.argmax(out.logits, axis=-1) == batch["targets"]) | ~batch["answer_mask"]
            return jnp.all(right, axis=-1) & jnp.any(batch["answer_mask"], axis=-1)

        self._correct = jax.jit(correct, out_shardings=sharding.replicated(mesh))

    def __call__(self, params, rows, num_steps: int, rng) -> np.ndarray:
        """Per problem, whether it was answered right at `num_steps` iterations."""
        length = max(len(ids) for ids, _ in rows) - 1
        results = []
        B, P = self.batch_size, jax.process_count()
        in_sharding = sharding.batch_sharding(self.mesh, self.rules)
        for start in range(0, len(rows), B):
            chunk = rows[start : start + B]
            batch = _batch(chunk + [(np.zeros(2, np.int32), np.zeros(2, bool))] * (B - len(chunk)), length)
            rows_here = B // P
            local = {k: v[jax.process_index() * rows_here : (jax.process_index() + 1) * rows_here] for k, v in batch.items()}
            global_batch = sharding.global_batch(local, in_sharding, B)
            ok = self._correct(params, global_batch, jnp.int32(num_steps), jax.random.fold_in(rng, start))
            results.append(np.asarray(ok)[: len(chunk)])
        return np.concatenate(results)


def parse_buckets(text: str) -> list[tuple[int, int]]:
    """'1-4,5-8,9' -> [(1, 4), (5, 8), (9, 9)]; '' gives power-of-two buckets (1, 2, 3-4, 5-8, ...)."""
    if not text:
        return [(1, 1), (2, 2)] + [(2**i + 1, 2 ** (i + 1)) for i in range(1, 12)]
    buckets = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            buckets.append((int(lo), int(hi or lo)))
        except ValueError:
            raise ValueError(f"eval.difficulty_buckets={text!r} must look like '1-4,5-8,9-16'.") from None
    return buckets


def bucket_of(difficulty: int, buckets: list[tuple[int, int]]) -> str:
    for lo, hi in buckets:
        if lo <= difficulty <= hi:
            return f"{lo}-{hi}" if hi > lo else str(lo)
    return str(difficulty)


def problem_label(task: str, difficulty: int, buckets: list[tuple[int, int]], trained: bool) -> str:
    """A held-out problem's table column, e.g. 's3/9-16', with '*' when training never saw its difficulty."""
    return f"{task}/{bucket_of(difficulty, buckets)}{'' if trained else '*'}"


def accuracy_table(correct_by_r: dict[int, np.ndarray], labels: list[str], trained: list[bool] | None = None) -> dict:
    """Overall and per-label (e.g. 'parity/9-16') accuracy for each r.

    With `trained` (per problem: is its difficulty one training saw), also the accuracy within and
    beyond the training difficulties.
    """
    rs = sorted(correct_by_r)
    groups = collections.defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    result = {
        "accuracy": [float(np.mean(correct_by_r[r])) for r in rs],
        "accuracy_by_difficulty": {label: [float(np.mean(correct_by_r[r][idx])) for r in rs] for label, idx in groups.items()},
    }
    if trained is not None:
        inside = np.asarray(trained, bool)
        for key, mask in (("accuracy_in_distribution", inside), ("accuracy_beyond_training", ~inside)):
            if mask.any():
                result[key] = [float(np.mean(correct_by_r[r][mask])) for r in rs]
    return result


def eval_batches(config, mesh, rules, tokenizer=None) -> list:
    """The fixed validation batches as global arrays (each process contributes its rows).

    With `tokenizer` (a run's saved one), built-in validation documents are encoded with it and no
    tokenizer is rebuilt from the built-in corpus.
    """
    sharding.check_batch(config.eval.batch_size, mesh, rules, "eval.batch_size")
    local = pipeline.make_eval_batches(
        config, batch_size=config.eval.batch_size // jax.process_count(), process_index=jax.process_index(),
        process_count=jax.process_count(), tokenizer=tokenizer,
    )
    batch_sharding = sharding.batch_sharding(mesh, rules)
    return [sharding.global_batch(b, batch_sharding, config.eval.batch_size) for b in local]


def validation_loss(eval_step, params, batches, num_steps_list, seed) -> dict:
    """Validation loss at each r (one compiled program for all of them)."""
    out = {}
    for r in num_steps_list:
        totals = [eval_step(params, b, jnp.int32(r), jax.random.key(seed)) for b in batches]
        loss = sum(float(t[0]) for t in totals) / max(sum(float(t[1]) for t in totals), 1.0)
        out[f"val_loss_r{r}"] = loss
    return out


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each id of a SentencePiece tokenizer stands for (byte pieces 1, special pieces 0)."""
    sp = tokenizer.processor
    sizes = np.zeros(tokenizer.vocab_size, np.int64)
    for i in range(tokenizer.vocab_size):
        if sp.is_byte(i):
            sizes[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            sizes[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return sizes


def target_bytes(batches, tokenizer) -> tuple[float, int]:
    """(loss weight, bytes of text) of the validation targets, for bits per byte."""
    sizes = token_bytes(tokenizer)
    weight, nbytes = 0.0, 0
    for b in batches:
        targets, weights = np.asarray(b["targets"]), np.asarray(b["weights"])
        inside = np.clip(targets, 0, len(sizes) - 1)
        weight += float(weights.sum())
        nbytes += int((sizes[inside] * (weights > 0)).sum())
    return weight, nbytes


def reasoning_requests(config, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The held-out problems as (BOS + prompt ids, answer ids): exact match is the answer being greedy."""
    problems = [p for ps in builtin.heldout_problems(config).values() for p in ps]
    bos = config.data.bos_id if config.data.bos_id >= 0 else tokenizer.bos_id
    return [(ids[:int(mask.argmax()) + 1].tolist(), ids[int(mask.argmax()) + 1:].tolist())
            for ids, mask in problem_rows(tokenizer, problems, bos)]


def has_reasoning(config) -> bool:
    return bool(config.eval.reasoning and config.data.source == "builtin" and config.data.builtin.task_fraction > 0)


def recurrence_scaling(config, model, params, mesh, rules, batches=None, eval_step=None, tokenizer=None) -> dict:
    """Validation loss and (built-in data) held-out reasoning accuracy at each r of eval.final_num_steps.

    `batches` and `eval_step` default to the config's validation batches and a fresh jitted step;
    `tokenizer` (for the problems) to the config's.
    """
    num_steps = [int(r) for r in config.eval.final_num_steps]
    batches = eval_batches(config, mesh, rules, tokenizer) if batches is None else batches
    if eval_step is None:
        eval_step = jax.jit(steps.make_eval_step(model, config.eval.init_scale), out_shardings=sharding.replicated(mesh))
    losses = validation_loss(eval_step, params, batches, num_steps, config.eval.seed)
    result = {"num_steps": num_steps, "val_loss": [losses[f"val_loss_r{r}"] for r in num_steps]}
    if has_reasoning(config):
        tokenizer = pipeline.load_tokenizer(config) if tokenizer is None else tokenizer
        problems = builtin.heldout_problems(config)
        flat = [(task, p) for task, ps in problems.items() for p in ps]
        bos = config.data.bos_id if config.data.bos_id >= 0 else tokenizer.bos_id
        rows = problem_rows(tokenizer, [p for _, p in flat], bos)
        buckets = parse_buckets(config.eval.difficulty_buckets)
        trained_difficulties = {int(d) for d in config.data.builtin.difficulties}
        trained = [p.difficulty in trained_difficulties for _, p in flat]
        labels = [problem_label(task, p.difficulty, buckets, ok) for (task, p), ok in zip(flat, trained)]
        by_difficulty = sorted(zip([(task, p.difficulty) for task, p in flat], labels))
        order = list(dict.fromkeys(label for _, label in by_difficulty))  # buckets by task, then difficulty
        run = ReasoningEval(model, mesh, rules, batch_size=config.eval.batch_size, init_scale=config.eval.init_scale)
        correct = {r: run(params, rows, r, jax.random.key(config.eval.seed)) for r in num_steps}
        table = accuracy_table(correct, labels, trained)
        table["accuracy_by_difficulty"] = {label: table["accuracy_by_difficulty"][label] for label in order}
        result.update(table, difficulties_trained=sorted(trained_difficulties))
    return result
