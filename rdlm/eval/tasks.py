"""Evaluation tasks: multiple choice and generation from JSONL, their prompts, and their lm-eval YAML.

A task is a JSONL file of records, one per line, optionally described by a spec file `NAME.json`:

    multiple choice   {"context": "...", "choices": ["...", ...], "label": 0}
    generation        {"question": "...", "answer": "... #### 42"}

A bare `.jsonl` takes lm-eval's defaults (its kind from the first record's fields): choices are
scored as `" " + choice`, and generation follows gsm8k.yaml (prompt "Question: {{question}}\\nAnswer:",
stop at "Question:", 256 new tokens, `#### N` as the strict answer). A spec overrides them:

    {"name": "parity-choice", "type": "multiple_choice", "data": "parity_choice.jsonl", "target_delimiter": ""}
    {"name": "...", "type": "generate_until", "data": "x.jsonl", "prompt": "Q: {{question}}\\nA:",
     "fewshot": [{"question": "...", "answer": "..."}], "until": ["Q:"], "max_gen_toks": 256, "strict": "gsm8k_cot"}

Contexts are rendered as lm-eval renders them without a chat template: each few-shot exemplar as
prompt + target_delimiter + answer + fewshot_delimiter, then the document's prompt. A spec with
`"chat": true` sends that context as the user's message through huginn's chat template (the rendering chat
training data goes through, rdlm.data.chat), ending in the assistant's header, as lm-eval's
`--apply_chat_template` does for a zero-shot task.
"""

import dataclasses
import json
from importlib import resources

from etils import epath

from rdlm.eval import scoring

MULTIPLE_CHOICE, GENERATION = "multiple_choice", "generate_until"
SHIPPED_DIR = "data"  # package data: rdlm/eval/data/<name>.json + .jsonl (+ .yaml for lm-eval)
_GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class ChoiceDoc:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class GenerationDoc:
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its documents and how lm-eval would render and score them."""

    name: str
    kind: str  # MULTIPLE_CHOICE or GENERATION
    data_path: str
    docs: tuple
    target_delimiter: str = " "
    prompt: str = "Question: {{question}}\nAnswer:"  # generation: the document's text ({{question}})
    fewshot: tuple[GenerationDoc, ...] = ()
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = _GSM8K_UNTIL
    max_gen_toks: int = 256
    strict: str = "gsm8k"  # a key of scoring.STRICT_PATTERNS
    chat: bool = False  # render each context as a user turn of huginn's chat template

    @property
    def metrics(self) -> tuple[str, ...]:
        return scoring.CHOICE_METRICS if self.kind == MULTIPLE_CHOICE else scoring.GENERATION_METRICS

    def render(self, question: str) -> str:
        return self.prompt.replace("{{question}}", question)

    def generation_context(self, doc: GenerationDoc, chat_text=None) -> str:
        shots = "".join(
            self.render(ex.question) + self.target_delimiter + ex.answer + self.fewshot_delimiter for ex in self.fewshot
        )
        return self._as_chat(shots + self.render(doc.question), chat_text)

    def choice_requests(self, chat_text=None) -> list[tuple[str, str]]:
        """(context, continuation) for every choice of every document, in order; `chat_text` (a codec's) renders
        chat contexts."""
        return [(self._as_chat(d.context, chat_text), self.target_delimiter + c) for d in self.docs for c in d.choices]

    def _as_chat(self, context: str, chat_text) -> str:
        if not self.chat:
            return context
        if chat_text is None:
            raise ValueError(f"Task {self.name} is a chat task; score it with a tokenizer that has huginn's chat tokens.")
        return chat_text([{"role": "user", "content": context}])


def _fail(path, line: int | None, message: str):
    where = f"{path}:{line}" if line else str(path)
    raise ValueError(f"Task file {where}: {message}")


def _choice_doc(path, line: int, record: dict) -> ChoiceDoc:
    for field in ("context", "choices", "label"):
        if field not in record:
            _fail(path, line, f"the record has no '{field}' field; a multiple-choice record needs context, choices and label.")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        _fail(path, line, f"'context' must be a string, not {type(context).__name__}.")
    if not isinstance(choices, list) or not choices:
        _fail(path, line, f"'choices' must be a non-empty list of strings, not {choices!r}.")
    if not all(isinstance(c, str) and c for c in choices):
        _fail(path, line, f"every choice must be a non-empty string; got {choices!r}.")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        _fail(path, line, f"'label' {label!r} must be an index into the {len(choices)} choices (0 to {len(choices) - 1}).")
    return ChoiceDoc(context, tuple(choices), label)


def _generation_doc(path, line: int, record: dict) -> GenerationDoc:
    for field in ("question", "answer"):
        if field not in record:
            _fail(path, line, f"the record has no '{field}' field; a generation record needs question and answer.")
        if not isinstance(record[field], str):
            _fail(path, line, f"'{field}' must be a string, not {type(record[field]).__name__}.")
    return GenerationDoc(record["question"], record["answer"])


def read_records(path) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSONL file."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Task file {path} does not exist.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(path, number, f"the line is not valid JSON ({e.msg}).")
        if not isinstance(record, dict):
            _fail(path, number, "each line must be a JSON object.")
        records.append((number, record))
    if not records:
        _fail(path, None, "it holds no records.")
    return records


def read_docs(path, kind: str | None = None) -> tuple[str, tuple]:
    """(kind, documents) of a JSONL task file; the kind defaults to what the first record looks like."""
    records = read_records(path)
    if kind is None:
        kind = MULTIPLE_CHOICE if "choices" in records[0][1] else GENERATION
    make = _choice_doc if kind == MULTIPLE_CHOICE else _generation_doc
    return kind, tuple(make(path, line, r) for line, r in records)


_SPEC_FIELDS = {"name", "type", "data", "target_delimiter", "prompt", "fewshot", "fewshot_delimiter", "until",
                "max_gen_toks", "strict", "chat"}


def load_spec(path) -> Task:
    """A task from its spec file (JSON), its data path relative to the spec."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Task spec {path} does not exist.")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Task spec {path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    unknown = sorted(set(spec) - _SPEC_FIELDS)
    if unknown:
        raise ValueError(f"Task spec {path} has unknown field(s) {unknown}; the fields are {sorted(_SPEC_FIELDS)}.")
    kind = spec.get("type")
    if kind not in (MULTIPLE_CHOICE, GENERATION):
        raise ValueError(f"Task spec {path}: 'type' must be '{MULTIPLE_CHOICE}' or '{GENERATION}', not {kind!r}.")
    if "data" not in spec:
        raise ValueError(f"Task spec {path} has no 'data' field (the JSONL file, relative to the spec).")
    data = path.parent / spec["data"]
    _, docs = read_docs(data, kind)
    fields = {k: v for k, v in spec.items() if k not in ("name", "type", "data", "fewshot", "until")}
    if "until" in spec:
        fields["until"] = tuple(spec["until"])
    if "fewshot" in spec:
        shots = spec["fewshot"]
        if not isinstance(shots, list):
            raise ValueError(f"Task spec {path}: 'fewshot' must be a list of {{question, answer}} records.")
        fields["fewshot"] = tuple(_generation_doc(path, None, s) for s in shots)
    if not isinstance(fields.get("chat", False), bool):
        raise ValueError(f"Task spec {path}: 'chat' must be true or false, not {fields['chat']!r}.")
    if fields.get("strict", "gsm8k") not in scoring.STRICT_PATTERNS:
        raise ValueError(f"Task spec {path}: 'strict' must be one of {sorted(scoring.STRICT_PATTERNS)}.")
    return Task(name=spec.get("name", path.stem), kind=kind, data_path=str(data), docs=docs, **fields)


def shipped_names() -> list[str]:
    """Names of the tasks that ship with rdlm (rdlm/eval/data/*.json)."""
    folder = resources.files("rdlm.eval") / SHIPPED_DIR
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def shipped_path(name: str) -> epath.Path:
    return epath.Path(str(resources.files("rdlm.eval") / SHIPPED_DIR / f"{name}.json"))


def load(name: str) -> Task:
    """A shipped task by name, a spec file (.json) or a bare JSONL file (lm-eval's defaults)."""
    if name in shipped_names():
        return load_spec(shipped_path(name))
    if name.endswith(".json"):
        return load_spec(name)
    if name.endswith(".jsonl"):
        kind, docs = read_docs(name)
        return Task(name=epath.Path(name).stem, kind=kind, data_path=name, docs=docs)
    raise ValueError(
        f"Unknown task {name!r}: give one of {', '.join(['builtin'] + shipped_names())}, a task spec (.json) "
        "or a JSONL file (.jsonl)."
    )


def lm_eval_yaml(task: Task) -> str:
    """The lm-eval task YAML that renders and scores `task` as rdlm.evaluate does, on its local JSONL."""
    q = json.dumps  # JSON strings are valid YAML scalars
    lines = [
        f"task: {q(task.name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(task.data_path))}",
        "test_split: test",
        f"output_type: {task.kind}",
        f"target_delimiter: {q(task.target_delimiter)}",
    ]
    if task.kind == MULTIPLE_CHOICE:
        lines += [
            'doc_to_text: "{{context}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{label}}"',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        ]
    else:
        lines += [
            f"doc_to_text: {q(task.prompt)}",
            'doc_to_target: "{{answer}}"',
            f"fewshot_delimiter: {q(task.fewshot_delimiter)}",
            f"num_fewshot: {len(task.fewshot)}",
        ]
        if task.fewshot:
            lines += ["fewshot_config:", "  sampler: first_n", "  samples:"]
            for ex in task.fewshot:
                lines += [f"    - {{question: {q(ex.question)}, answer: {q(ex.answer)}}}"]
        lines += [
            "generation_kwargs:",
            f"  until: {q(list(task.until))}",
            "  do_sample: false",
            "  temperature: 0.0",
            f"  max_gen_toks: {task.max_gen_toks}",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            "    ignore_case: true",
            "    ignore_punctuation: false",
            f"    regexes_to_ignore: {q(list(scoring.IGNORED))}",
            "filter_list:",
            '  - name: "strict-match"',
            "    filter:",
            f"      - {{function: regex, regex_pattern: {q(scoring.STRICT_PATTERNS[task.strict])}}}",
            "      - {function: take_first}",
            '  - name: "flexible-extract"',
            "    filter:",
            f"      - {{function: regex, group_select: -1, regex_pattern: {q(scoring.FLEXIBLE_PATTERN)}}}",
            "      - {function: take_first}",
        ]
    return "\n".join(lines) + "\n"
