"""The built-in corpus, needing no download: stdlib Python sources mixed with reasoning problems.

Code documents are the `.py` files under `data.builtin.code_dir`, by default the running interpreter's
standard library (no `test/`, `tests/` or site-packages); a stable hash of each file's relative path
holds out a fixed share for validation.
Task documents are problems from `rdlm.data.tasks`, formatted as prompt then answer, added until
they make up `task_fraction` of the training tokens (counting BOS and EOS). Held-out problems use
another seed, and training drops problems whose prompt is held out (where the problem space allows
it). The documents are tokenized with `data.tokenizer` when it is set (a resumed run sets it to
its own saved tokenizer); otherwise a SentencePiece tokenizer is trained on a sample of both and
cached under `data.cache_dir`, keyed by a hash of its training text.

The corpus therefore depends on the machine: another Python version has another stdlib. Its
`fingerprint` (a hash of every tokenized document, train and held-out, in order) is stored in each
checkpoint, and `rdlm.train` refuses to resume a run on a corpus with another fingerprint.
"""

import collections
import dataclasses
import functools
import hashlib
import importlib
import math
import sysconfig
import zlib
from typing import Any

import numpy as np
from etils import epath

from rdlm import storage
from rdlm.data import config as config_lib
from rdlm.data import tokenizer as tokenizer_lib

_EXCLUDED_DIRS = frozenset({"test", "tests", "site-packages"})
_HELDOUT_SEED_OFFSET = 1_000_003
# Problems per task generated for the tokenizer's training text and the tokens-per-problem estimate.
_SAMPLE_PROBLEMS = 2000


@dataclasses.dataclass(frozen=True)
class BuiltinSpec:
    """The `data.builtin` fields that decide the corpus, as a hashable value."""

    vocab_size: int
    seed: int
    tasks: tuple[str, ...]
    difficulties: tuple[int, ...]
    heldout_difficulties: tuple[int, ...]
    task_fraction: float
    mask_prompt: bool
    heldout_code_percent: float
    heldout_problems: int
    code_max_mb: float
    tokenizer_train_mb: float
    code_dir: str  # '' = the interpreter's stdlib
    tokenizer: str  # data.tokenizer: '' = train one (or load it from the cache)

    @classmethod
    def from_config(cls, data_config) -> "BuiltinSpec":
        """Reads `data.builtin` (see rdlm/data/config.py for the fields)."""
        b = data_config.builtin
        tasks = b.tasks.split(",") if isinstance(b.tasks, str) else b.tasks
        if not 0.0 <= b.task_fraction < 1.0:
            raise ValueError(
                f"data.builtin.task_fraction={b.task_fraction} must be in [0, 1): it is the share "
                "of training tokens that are reasoning problems."
            )
        return cls(
            vocab_size=int(b.vocab_size), seed=int(b.seed),
            tasks=tuple(t.strip() for t in tasks if t.strip()),
            difficulties=tuple(int(d) for d in b.difficulties),
            heldout_difficulties=tuple(int(d) for d in (b.get("heldout_difficulties") or b.difficulties)),
            task_fraction=float(b.task_fraction), mask_prompt=bool(b.mask_prompt),
            heldout_code_percent=float(b.heldout_code_percent),
            heldout_problems=int(b.heldout_problems),
            code_max_mb=float(b.code_max_mb), tokenizer_train_mb=float(b.tokenizer_train_mb),
            code_dir=str(b.get("code_dir", "")), tokenizer=str(data_config.get("tokenizer", "")),
        )


@dataclasses.dataclass(frozen=True)
class BuiltinCorpus:
    """The built corpus: its tokenizer, tokenized documents and token counts."""

    tokenizer: tokenizer_lib.Tokenizer
    train_docs: list[Any]  # np.int32 arrays (code) and dicts with `ids`/`loss_mask` (problems).
    eval_docs: list[Any]
    code_tokens: int
    task_tokens: int
    fingerprint: str  # hex digest of every document, train and held-out, in order


def code_root(spec: BuiltinSpec) -> epath.Path:
    """The directory the code documents come from: `data.builtin.code_dir`, or the interpreter's stdlib."""
    if not spec.code_dir:
        return epath.Path(sysconfig.get_paths()["stdlib"])
    root = storage.path(spec.code_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.builtin.code_dir={spec.code_dir!r} is not a directory; give a directory of .py files "
            "or '' for this interpreter's standard library."
        )
    return root


def code_files(root: epath.Path) -> list[str]:
    """The `.py` files under `root` as sorted relative paths, without test dirs or site-packages."""
    names = []
    for folder, subdirs, files in root.walk():
        subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
        prefix = folder.relative_to(root).as_posix()
        names += [n if prefix == "." else f"{prefix}/{n}" for n in files if n.endswith(".py")]
    return sorted(names)


def _stable_hash(text: str) -> int:
    """A hash that is the same in every process and Python version."""
    return zlib.crc32(text.encode("utf-8"))


def _read_code(path: epath.Path) -> str:
    """A source file as text (undecodable bytes replaced, newlines as text mode reads them)."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def code_texts(spec: BuiltinSpec) -> tuple[list[str], list[str]]:
    """Returns (train, held-out) code file texts; training keeps at most `code_max_mb`."""
    root = code_root(spec)
    names = code_files(root)
    if not names:
        raise ValueError(f"data.builtin.code_dir={str(root)!r} holds no .py files; point it at Python sources.")
    # A stable pseudo-random order, so that a size cap takes files from the whole library.
    names.sort(key=lambda n: (_stable_hash(n), n))
    train, heldout, budget = [], [], spec.code_max_mb * 1e6 or math.inf
    for name in names:
        path = root / name
        if _stable_hash(name) % 10_000 < spec.heldout_code_percent * 100:
            heldout.append(_read_code(path))
        elif budget >= (size := path.stat().length):
            train.append(_read_code(path))
            budget -= size
    return train, heldout


def _tasks_module():
    """Imports `rdlm.data.tasks` (owned elsewhere), naming the fix if it is missing."""
    try:
        return importlib.import_module("rdlm.data.tasks")
    except ImportError as e:
        raise ImportError(
            "The built-in data mix needs rdlm.data.tasks for its reasoning problems; set "
            f"data.builtin.task_fraction=0 to train on code only ({e})."
        ) from e


def _task_names(spec: BuiltinSpec) -> tuple[str, ...]:
    """Returns the configured task names, all of `tasks.TASKS` by default."""
    if spec.task_fraction == 0:
        return ()
    known = tuple(_tasks_module().TASKS)
    unknown = [t for t in spec.tasks if t not in known]
    if unknown:
        raise ValueError(f"data.builtin.tasks has unknown tasks {unknown}; choose from {known}.")
    return spec.tasks or known


def _generate(task: str, num: int, seed: int, spec: BuiltinSpec, heldout: bool = False) -> list:
    """Generates `num` problems of one task, at the training or the held-out difficulties."""
    difficulties = spec.heldout_difficulties if heldout else spec.difficulties
    return list(_tasks_module().generate(task, num, seed=seed, difficulties=difficulties))


def _heldout(spec: BuiltinSpec) -> dict[str, list]:
    """Generates the held-out problems of each task, from a seed training never uses."""
    seed = spec.seed + _HELDOUT_SEED_OFFSET
    return {t: _generate(t, spec.heldout_problems, seed, spec, heldout=True) for t in _task_names(spec)}


def heldout_problems(data_config) -> dict[str, list]:
    """Returns the held-out problems of each configured task (for the accuracy evaluation)."""
    return _heldout(BuiltinSpec.from_config(config_lib.data_section(data_config)))


def _drop_heldout(problems: list, heldout: list) -> list:
    """Drops problems whose prompt is held out, except at difficulties too small to hold out.

    At a difficulty where held-out prompts cover more than half of the generated problems (parity
    of 2 bits has 4 prompts), the problem space is too small to separate and nothing is dropped.
    """
    seen = {p.prompt for p in heldout}
    total, clash = collections.Counter(), collections.Counter()
    for p in problems:
        total[p.difficulty] += 1
        clash[p.difficulty] += p.prompt in seen
    separable = {d for d in total if 2 * clash[d] <= total[d]}
    return [p for p in problems if p.difficulty not in separable or p.prompt not in seen]


def encode_problems(tok: tokenizer_lib.Tokenizer, problems, mask_prompt: bool = True) -> list:
    """Tokenizes problems as documents: prompt ids then answer ids, the prompt out of the loss.

    Evaluation should prompt the model with `[bos] + tok.encode(problem.prompt)`, the same prefix
    the model sees in training (packing adds BOS and EOS).
    """
    prompts = tok.encode_batch([p.prompt for p in problems])
    answers = tok.encode_batch([p.answer for p in problems])
    docs = []
    for prompt, answer in zip(prompts, answers):
        mask = np.concatenate([np.full(len(prompt), not mask_prompt), np.ones(len(answer), bool)])
        docs.append({"ids": np.asarray(prompt + answer, dtype=np.int32), "loss_mask": mask})
    return docs


def _tokenizer_text(spec: BuiltinSpec, code: list[str], samples: dict[str, list]) -> list[str]:
    """Returns the tokenizer's training text: a code sample and problems, in the mix's ratio."""
    budget = spec.tokenizer_train_mb * 1e6 * (1 - spec.task_fraction)
    texts = []
    for text in code:
        if budget <= 0:
            break
        texts.append(text)
        budget -= len(text)
    problems = [p.prompt + p.answer for task in samples.values() for p in task]
    chunk = 64  # Problems per training sentence: short lines are cheap for SentencePiece this way.
    texts += ["\n".join(problems[i:i + chunk]) for i in range(0, len(problems), chunk)]
    return texts


def cached_tokenizer(spec: BuiltinSpec, texts: list[str], cache_dir: str):
    """Trains the tokenizer on `texts`, or loads it from the cache (local or gs://) if this exact text was seen."""
    key = hashlib.sha256(f"{spec.vocab_size}|{tokenizer_lib.USER_PIECES}".encode())
    for text in texts:
        key.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
    path = storage.path(cache_dir) / f"builtin-{key.hexdigest()[:16]}.model"
    if storage.exists(path):
        return tokenizer_lib.Tokenizer.from_file(path)
    tok = tokenizer_lib.train_tokenizer(texts, spec.vocab_size)
    storage.makedirs(path.parent)
    tok.save(path)  # an atomic write: concurrent processes never read half a file
    return tok


def _tokenizer(spec: BuiltinSpec, code: list[str], samples: dict, cache_dir: str) -> tokenizer_lib.Tokenizer:
    """`data.tokenizer` if set, else the one trained for this corpus (or its cached copy)."""
    if spec.tokenizer:
        return tokenizer_lib.Tokenizer.from_file(spec.tokenizer)
    return cached_tokenizer(spec, _tokenizer_text(spec, code, samples), cache_dir)


def fingerprint(train_docs: list, eval_docs: list) -> str:
    """A hash of the documents exactly as training and evaluation see them (ids, loss masks, order)."""
    digest = hashlib.sha256(b"rdlm builtin corpus v1")
    for split, docs in ((b"train", train_docs), (b"eval", eval_docs)):
        digest.update(split + len(docs).to_bytes(8, "little"))
        for doc in docs:
            ids = doc["ids"] if isinstance(doc, dict) else doc
            digest.update(len(ids).to_bytes(8, "little") + np.asarray(ids, "<i4").tobytes())
            if isinstance(doc, dict):
                digest.update(b"mask" + np.packbits(np.asarray(doc["loss_mask"], bool)).tobytes())
    return digest.hexdigest()[:16]


def _task_documents(tok, spec: BuiltinSpec, samples: dict, heldout: dict, budget: float) -> list:
    """Tokenized training problems of every task, `budget` tokens (with BOS/EOS) per task."""
    docs = []
    for task, sample in samples.items():
        sample_tokens = sum(len(d["ids"]) + 2 for d in encode_problems(tok, sample))
        num = math.ceil(budget * len(sample) / sample_tokens)
        # A margin for dropped held-out prompts, then documents until the budget is met.
        problems = _drop_heldout(_generate(task, num + num // 4 + 16, spec.seed, spec),
                                 heldout[task])
        tokens = 0
        for doc in encode_problems(tok, problems, spec.mask_prompt):
            if tokens >= budget:
                break
            docs.append(doc)
            tokens += len(doc["ids"]) + 2
    return docs


def _eval_documents(spec: BuiltinSpec, tok: tokenizer_lib.Tokenizer, code_eval: list[str]) -> list:
    """The validation documents: held-out code files, then the held-out problems of every task."""
    docs = [np.asarray(ids, np.int32) for ids in tok.encode_batch(code_eval)]
    if _task_names(spec):
        docs += encode_problems(tok, [p for ps in _heldout(spec).values() for p in ps], spec.mask_prompt)
    return docs


def eval_documents(data_config, tok: tokenizer_lib.Tokenizer) -> list:
    """The validation documents encoded with `tok` (a run's saved tokenizer), building no tokenizer."""
    spec = BuiltinSpec.from_config(config_lib.data_section(data_config))
    return _eval_documents(spec, tok, code_texts(spec)[1])


@functools.lru_cache(maxsize=2)
def build(spec: BuiltinSpec, cache_dir: str) -> BuiltinCorpus:
    """Builds the corpus (deterministic for a spec; cached per process)."""
    code_train, code_eval = code_texts(spec)
    samples = {t: _generate(t, _SAMPLE_PROBLEMS, spec.seed, spec) for t in _task_names(spec)}
    tok = _tokenizer(spec, code_train, samples, cache_dir)

    code = [np.asarray(ids, np.int32) for ids in tok.encode_batch(code_train)]
    eval_docs = _eval_documents(spec, tok, code_eval)
    code_tokens = sum(len(d) + 2 for d in code)
    tasks = []
    if samples:
        heldout = _heldout(spec)
        budget = code_tokens * spec.task_fraction / (1 - spec.task_fraction) / len(samples)
        tasks = _task_documents(tok, spec, samples, heldout, budget)
    task_tokens = sum(len(d["ids"]) + 2 for d in tasks)
    train_docs = code + tasks
    return BuiltinCorpus(tok, train_docs, eval_docs, code_tokens, task_tokens, fingerprint(train_docs, eval_docs))
