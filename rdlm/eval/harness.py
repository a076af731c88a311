"""The lm-evaluation-harness model `rdlm` (install the `eval` extra: pip install "rdlm[eval]").

    rdlm-lm-eval run --model rdlm --model_args checkpoint=runs/tiny,num_steps=32 --tasks TASK \\
        [--include_path DIR] [--apply_chat_template]

model_args: checkpoint (workdir, Orbax step directory or HF directory, local or gs://), num_steps
(r, default 32), exit ('kl:5e-4', default none), dtype (float32/bfloat16), batch_size, tokenizer,
init_scale, seed. The model scores through rdlm.eval.engine, the code `rdlm.evaluate` uses, so both
give the same numbers on the same task. Generation is greedy and stops at the task's `until` strings
and at the checkpoint's end tokens (huginn's <|end_text|>, <|end_turn|>, <|begin_text|>).

rdlm declares the model as an `lm_eval.models` entry point, the plugin group lm-eval discovers
itself after 0.4.13. lm-eval 0.4.13 reads no entry points, so `rdlm-lm-eval` (this module's `cli`)
loads that group into lm-eval's registry and then runs lm-eval's own command line unchanged; in
Python, call `register()` before `lm_eval.simple_evaluate(model="rdlm", ...)`.
"""

import importlib.metadata

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from rdlm.eval import runner
from rdlm.sampling import parse_exit

ENTRY_POINT_GROUP = "lm_eval.models"


def register() -> list[str]:
    """Adds every installed `lm_eval.models` entry point (rdlm's `rdlm` among them) to lm-eval's registry."""
    added = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=ep)
            added.append(ep.name)
    return added


def cli() -> None:
    """`lm-eval` with the entry-point models registered first (the `rdlm-lm-eval` command)."""
    from lm_eval.__main__ import cli_evaluate

    register()
    cli_evaluate()


class RdlmLM(TemplateLM):
    """A recurrent-depth checkpoint evaluated at a fixed r (or with a per-token adaptive exit)."""

    def __init__(self, checkpoint: str, num_steps: int = 32, exit: str = "", dtype: str | None = None,
                 batch_size: int | str = 16, tokenizer: str | None = None, init_scale: float | None = None,
                 seed: int | None = None, max_batch_size=None, device=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"Unknown model_args {sorted(unused)} for --model rdlm; it takes checkpoint, num_steps, "
                             "exit, dtype, batch_size, tokenizer, init_scale and seed.")
        self.num_steps = int(num_steps)
        self.exit = parse_exit(str(exit)) if exit else None
        rows = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.model = runner.load_model(str(checkpoint), dtype=dtype or None, tokenizer=tokenizer or None)
        self.engine = self.model.engine(batch_size=rows, init_scale=None if init_scale is None else float(init_scale),
                                        seed=None if seed is None else int(seed), max_steps=self.num_steps)
        self.codec = self.model.codec
        self._tokenizer_name = f"rdlm:{checkpoint}:{tokenizer or 'own'}"

    @property
    def eot_token_id(self) -> int:
        return (self.codec.stop_ids or (self.engine.prefix_id,))[0]

    @property
    def prefix_token_id(self) -> int:
        return self.engine.prefix_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is False:
            return list(self.codec.encode_fn(string))
        return self.engine.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.codec.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored = self.engine.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests], self.num_steps, self.exit)
        out = list(zip(scored.loglikelihood, scored.greedy))
        for (key, _, _), answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = list(self.codec.encode_fn(text))
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        scored = self.engine.loglikelihood_tokens(windows, self.num_steps, self.exit)
        totals = [0.0] * len(requests)
        for i, ll in zip(owner, scored.loglikelihood):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict = {}
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("--model rdlm generates greedily; set do_sample=false and temperature=0.")
            until = kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            key = (until, int(kwargs.get("max_gen_toks", 256)))
            groups.setdefault(key, []).append((i, context))
        texts = [""] * len(requests)
        for (until, max_gen_toks), items in groups.items():
            out = self.engine.generate([c for _, c in items], until=until, max_gen_toks=max_gen_toks,
                                       num_steps=self.num_steps, exit=self.exit)
            for (i, _), text in zip(items, out.text):
                texts[i] = text
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "huginn-0125" if self.codec.chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """huginn-0125's template (spec section 3.8), the rendering chat training data goes through (rdlm.data.chat)."""
        if not self.codec.chat_template:
            raise ValueError(f"--apply_chat_template needs a tokenizer with huginn's chat tokens: {self.codec.chat_error}")
        return self.codec.chat_text(chat_history, add_generation_prompt)
