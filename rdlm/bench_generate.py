"""`python -m rdlm.bench generate`: new tokens/s, iterations per token and agreement with plain greedy decoding.

    python -m rdlm.bench generate --checkpoint=runs/tiny --num_steps=32 [--exit=kl:5e-4] [--check_every=C]
        [--noexit_in_prefill] [--sampler=sequential|speculative|parallel] [--dtype=float32|bfloat16] [--batch=B]
        [--compare]

With --checkpoint the model is a trained one (a workdir, an Orbax step or an HF directory) and the
prompts come from its run's held-out data through its own tokenizer: windows of held-out code and the
last tokens of held-out problems (ending at `=`), alternately. Without it the model is a random one
of the bench config, prompted with random tokens. A pass generates `bench.new_tokens` greedy tokens
after each of `bench.gen_prompts` prompts of `bench.prompt_len` tokens, `batch` prompts per call.

`agreement` is the fraction of generated tokens equal, position by position, to those of the
baseline: sequential fixed-depth float32 greedy decoding at batch 1 and the same num_steps, on the
same prompts. `diverged_prompts` counts the rows with any difference: after one different token a
row's continuation is another text, so agreement falls in steps of up to 1/prompts.
`mean_prompt_steps` (sequential sampler) is the iterations a prompt ran: with an exit criterion the
prompt stops by it too, as in the reference, unless --noexit_in_prefill.

--compare times baseline and variant alternately in this process (`bench.gen_repeats` rounds, the
order swapped every round) and reports the median of the per-round speed-ups, which is what a
machine shared with other jobs allows; without it only the variant is timed.
"""

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rdlm import checkpoint_io, sampling
from rdlm.sampling import exits
from rdlm.model import ModelConfig, RecurrentLM
from rdlm.sampling import precision

SAMPLERS = ("sequential", "speculative", "parallel")


@dataclasses.dataclass(frozen=True)
class Variant:
    """How tokens are generated; Variant() is the baseline every variant is compared with."""

    sampler: str = "sequential"
    exit: str = ""  # 'criterion[:threshold]' (sequential only); '' = fixed depth
    check_every: int = 0  # 0: the criterion's default (rdlm.sampling.exits.DEFAULT_CHECK_EVERY)
    exit_in_prefill: bool = True  # the prompt's iterations stop by the criterion too (the reference's default)
    dtype: str = "float32"
    batch: int = 1
    parallel: sampling.ParallelSettings = sampling.ParallelSettings()  # the parallel sampler's wavefront

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler={self.sampler!r} is not one of {', '.join(SAMPLERS)}.")
        if self.dtype not in precision.DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is not one of {', '.join(precision.DTYPES)}.")
        if self.exit and self.sampler != "sequential":
            raise ValueError(f"--exit works with --sampler=sequential, not {self.sampler}.")
        if self.check_every < 0:
            raise ValueError(f"--check_every={self.check_every} must be >= 0 (0: the criterion's default).")
        exits.check_exit_flags(self.exit, self.check_every, self.exit_in_prefill)
        if self.batch < 1:
            raise ValueError(f"--batch={self.batch} must be >= 1.")

    def options(self, num_steps: int) -> dict:
        """The settings this variant runs with, as the JSON line reports them."""
        out = {"sampler": self.sampler, "dtype": self.dtype, "batch": self.batch}
        if self.exit:
            criterion = sampling.parse_exit(self.exit)
            interval = sampling.SamplerOptions(num_steps=num_steps, exit=criterion, check_every=self.check_every)
            out.update(exit=f"{criterion.name}:{criterion.threshold}", check_every=interval.check_interval,
                       exit_in_prefill=self.exit_in_prefill)
        if self.sampler == "parallel":
            out.update(self.parallel.describe(num_steps))
        if self.sampler == "speculative":
            out.update(draft_steps=SPECULATIVE["draft_steps"], lookahead=SPECULATIVE["lookahead"])
        return out


SPECULATIVE = dict(draft_steps=4, lookahead=8)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one timed pass generates."""

    prompts: np.ndarray  # [N, P] int32
    new_tokens: int
    num_steps: int
    init_scale: float
    seed: int
    kinds: dict  # prompts per source ('code', 'problem', 'random')


def make_runner(config: ModelConfig, params, variant: Variant, work: Workload):
    """`run(prompts [b, P]) -> (tokens [b, new], steps [b, new], extra)` for one call of the variant."""
    config, params = precision.with_dtype(config, params, variant.dtype)
    common = dict(max_new_tokens=work.new_tokens, num_steps=work.num_steps, init_scale=work.init_scale)
    criterion = sampling.parse_exit(variant.exit) if variant.exit else None
    rng = jax.random.key(work.seed)

    def run(prompts):
        extra = {}
        if variant.sampler == "sequential":
            out = sampling.generate(config, params, prompts, rng=rng, check_every=variant.check_every,
                                    exit_in_prefill=variant.exit_in_prefill,
                                    exit_criterion=criterion and criterion.name,
                                    exit_threshold=criterion and criterion.threshold, **common)
            extra = {"prompt_steps": int(np.sum(out.prompt_steps))}
        elif variant.sampler == "speculative":
            out = sampling.generate_speculative(config, params, prompts, rng=rng, **SPECULATIVE, **common)
            extra = {"drafted": int(np.sum(out.drafted)), "accepted": int(np.sum(out.accepted))}
        else:
            out = sampling.generate_parallel(config, params, prompts, rng=rng, settings=variant.parallel, **common)
            extra = {"passes": int(out.passes)}
        P = prompts.shape[1]
        tokens = np.asarray(out.tokens)[:, P : P + work.new_tokens]
        return tokens, np.asarray(out.steps_per_token), extra

    return run


@dataclasses.dataclass
class Pass:
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (all threads): steadier than wall time on a loaded machine
    tokens: np.ndarray  # [N, new]
    steps: np.ndarray  # [N, new]
    extra: dict  # sampler counters, summed over calls


def time_pass(run, work: Workload, batch: int) -> Pass:
    """One pass over the prompts, `batch` per call."""
    tokens, steps, extras, seconds, cpu = [], [], {}, 0.0, 0.0
    for start in range(0, len(work.prompts), batch):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        t, s, extra = run(work.prompts[start : start + batch])
        seconds += time.perf_counter() - begin
        cpu += time.process_time() - begin_cpu
        tokens.append(t)
        steps.append(s)
        for key, value in extra.items():
            extras[key] = extras.get(key, 0) + value
    return Pass(seconds, cpu, np.concatenate(tokens), np.concatenate(steps), extras)


def heldout_prompts(checkpoint, count: int, length: int, seed: int) -> tuple[np.ndarray, dict]:
    """`count` prompts of exactly `length` tokens from the checkpoint's run, alternately code and problems.

    Code prompts are windows of the held-out stdlib files; problem prompts are the last `length`
    tokens of [BOS] + a held-out problem's prompt (its `=` last), from the problems long enough for
    that. A run trained on other data (or an HF checkpoint) gets code windows only.
    """
    from rdlm.data import builtin, config as data_config_lib
    from rdlm.sampling import text

    codec = text.load_codec(checkpoint)
    run_config = checkpoint_io.read_run_config(checkpoint)
    data = data_config_lib.get_config()
    if run_config is not None and run_config.get("data", {}).get("source") == "builtin":
        data = ml_collections.ConfigDict(run_config["data"])
    spec = builtin.BuiltinSpec.from_config(data)
    problems = []
    if data.source == "builtin" and run_config is not None and spec.task_fraction > 0:
        for task_problems in builtin.heldout_problems(data).values():
            problems += task_problems
    bos = [] if codec.bos_id is None else [codec.bos_id]
    problem_ids = [ids[-length:] for ids in (bos + codec.encode_fn(p.prompt) for p in problems) if len(ids) >= length]
    _, code = builtin.code_texts(spec)
    rng = np.random.default_rng(seed)
    code_ids = [ids for ids in (codec.encode_fn(t) for t in code) if len(ids) >= length]
    if not code_ids:
        raise ValueError(f"No held-out code file has {length} tokens; lower config.bench.prompt_len.")
    prompts, kinds = [], {"code": 0, "problem": 0}
    for i in range(count):
        if i % 2 and problem_ids:  # spread over the held-out problems (they come grouped by task)
            prompts.append(problem_ids[kinds["problem"] * len(problem_ids) // (count // 2)])
            kinds["problem"] += 1
        else:
            ids = code_ids[rng.integers(len(code_ids))]
            start = int(rng.integers(len(ids) - length + 1))
            prompts.append(ids[start : start + length])
            kinds["code"] += 1
    return np.asarray(prompts, np.int32), kinds


def random_model(model_config: ModelConfig, seed: int, count: int, length: int):
    """(params, prompts) of a randomly initialised model: the bench's default, without --checkpoint."""
    from rdlm import state as state_lib

    rng = jax.random.key(seed)
    ids = jnp.zeros((1, length), jnp.int32)
    params = jax.jit(lambda r: RecurrentLM(model_config).init({"params": r}, ids, num_steps=1, init_scale=0.0))(rng)
    prompts = jax.random.randint(jax.random.fold_in(rng, 1), (count, length), 0, model_config.vocab_size)
    return state_lib.strip_boxes(params["params"]), np.asarray(prompts, np.int32)


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _summary(passes: list[Pass]) -> dict:
    last = passes[-1]
    used = last.steps[last.steps > 0]
    wall, cpu = statistics.median(p.seconds for p in passes), statistics.median(p.cpu_seconds for p in passes)
    return {"seconds": _sig(wall), "new_tokens_per_s": _sig(last.tokens.size / wall),
            "cpu_new_tokens_per_s": _sig(last.tokens.size / cpu),
            "mean_steps_per_token": _sig(float(used.mean()) if used.size else 0.0)}


def bench_generate(bench_config, variant: Variant, *, checkpoint: str = "", num_steps: int = 0,
                   compare: bool = False, model_config: ModelConfig | None = None) -> dict:
    """Times `variant` (and with `compare` the baseline, alternately) and returns the JSON line's dict.

    `model_config` is the random model's (without a checkpoint)."""
    b = bench_config.bench
    if b.gen_repeats < 1:
        raise ValueError(f"config.bench.gen_repeats={b.gen_repeats} must be >= 1.")
    count = b.gen_prompts
    if count < 1 or count % variant.batch:
        raise ValueError(f"config.bench.gen_prompts={count} must be a positive multiple of --batch={variant.batch}.")
    if checkpoint:
        model_config, params = checkpoint_io.load_params(checkpoint)
        prompts, kinds = heldout_prompts(checkpoint, count, b.prompt_len, b.seed)
    else:
        params, prompts = random_model(model_config, b.seed, count, b.prompt_len)
        kinds = {"random": count}
    work = Workload(prompts, b.new_tokens, num_steps or b.gen_num_steps, b.gen_init_scale, b.seed, kinds)
    load_start = os.getloadavg()[0]
    run = make_runner(model_config, params, variant, work)
    first = time_pass(run, work, variant.batch)  # compiles
    baseline = Variant()
    base_run = run if variant == baseline else make_runner(model_config, params, baseline, work)
    reference = first.tokens if base_run is run else time_pass(base_run, work, 1).tokens
    passes, base_passes, ratios, cpu_ratios = [], [], [], []
    for r in range(b.gen_repeats):
        order = ("variant", "baseline") if r % 2 == 0 else ("baseline", "variant")
        for which in order if compare else ("variant",):
            if which == "variant":
                passes.append(time_pass(run, work, variant.batch))
            else:
                base_passes.append(time_pass(base_run, work, 1))
        if compare:
            ratios.append(base_passes[-1].seconds / passes[-1].seconds)
            cpu_ratios.append(base_passes[-1].cpu_seconds / passes[-1].cpu_seconds)
    extra = dict(passes[-1].extra)
    if "prompt_steps" in extra:  # iterations of each prompt, whose exit (in prefill) the variant may take
        extra["mean_prompt_steps"] = _sig(extra.pop("prompt_steps") / count)
    result = {
        "checkpoint": checkpoint or "(random init)",
        **variant.options(work.num_steps),
        "num_steps": work.num_steps,
        "init_scale": work.init_scale,
        "prompts": count,
        "prompt_kinds": kinds,
        "prompt_len": b.prompt_len,
        "new_tokens": work.new_tokens,
        "rounds": b.gen_repeats,
        "compile_s": _sig(max(first.seconds - statistics.median(p.seconds for p in passes), 1e-6)),
        **_summary(passes),
        "agreement": _sig(float(np.mean(passes[-1].tokens == reference))),
        "diverged_prompts": int(np.sum(np.any(passes[-1].tokens != reference, axis=1))),
        **extra,
    }
    if compare:
        result["baseline"] = _summary(base_passes)
        result["speedup"] = _sig(statistics.median(ratios))
        result["speedup_range"] = [_sig(min(ratios)), _sig(max(ratios))]
        result["cpu_speedup"] = _sig(statistics.median(cpu_ratios))
    result["load_avg"] = [_sig(load_start, 3), _sig(os.getloadavg()[0], 3)]
    return result
