"""Decode throughput of a compiled sampler (what the benchmark reports), with compilation kept out.

    result = timing.bench_decode(config, params, num_steps=16, exit_criterion="kl")
    result.new_tokens_per_s, result.mean_steps_per_token

Any of Sampler, SpeculativeSampler or ParallelSampler can be timed with `measure`; the first call
compiles, later calls with the same shapes reuse the compiled code (`compiles` counts new ones).
"""

import dataclasses
import time

import jax
import numpy as np

from rdlm.model.config import ModelConfig
from rdlm.sampling import decode
from rdlm.sampling.options import SamplerOptions
from rdlm.sampling.prompts import prepare_prompts


@dataclasses.dataclass
class Throughput:
    new_tokens_per_s: float  # generated tokens / decode-loop seconds (the loop emits every new token)
    mean_steps_per_token: float  # core iterations per generated token
    new_tokens: int
    prefill_s: float  # best over repeats
    decode_s: float  # best over repeats
    first_call_s: float  # the untimed warm-up, compilation included
    compiles: int  # programs compiled by this call (0 when warm)


def _cache_sizes(sampler) -> int:
    return sampler.decode._cache_size() + decode.prefill._cache_size()


def measure(sampler, params, prompt_ids, *, max_new_tokens: int, options: SamplerOptions | None = None, rng=None,
            repeats: int = 3) -> Throughput:
    """Times prefill and the decode loop separately (best of `repeats`), after one warm-up run."""
    options = sampler.options if options is None else options
    knobs = sampler.knobs(options) if hasattr(sampler, "knobs") else options.knobs()
    ids, lengths, rng = prepare_prompts(sampler.config, prompt_ids, None, max_new_tokens, rng, pad_id=options.pad_id)
    compiled_before = _cache_sizes(sampler)

    def run():
        t0 = time.perf_counter()
        st = sampler.prefill(params, knobs, ids, lengths, rng, max_new_tokens=max_new_tokens)
        st = jax.block_until_ready(st)
        t1 = time.perf_counter()
        st = jax.block_until_ready(sampler.decode(params, knobs, st))
        return t1 - t0, time.perf_counter() - t1, getattr(st, "base", st)

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = [run() for _ in range(repeats)]
    prefill_s, decode_s = min(t[0] for t in times), min(t[1] for t in times)
    steps = np.asarray(times[-1][2].steps_BM)
    n = int((steps > 0).sum())
    return Throughput(
        new_tokens_per_s=n / decode_s,
        mean_steps_per_token=float(steps[steps > 0].mean()) if n else 0.0,
        new_tokens=n,
        prefill_s=prefill_s,
        decode_s=decode_s,
        first_call_s=first,
        compiles=_cache_sizes(sampler) - compiled_before,
    )


def bench_decode(config: ModelConfig, params, *, batch: int = 1, prompt_len: int = 32, max_new_tokens: int = 32,
                 num_steps: int = 16, exit_criterion: str | None = None, exit_threshold=None,
                 kv_share: int | None = None, init_scale: float = 0.0, repeats: int = 3,
                 seed: int = 0) -> Throughput:
    """The benchmark's shape: greedy decoding of a random prompt (batch 1, 32 + 32 tokens, r = 16 by default).

    Samplers are cached per (config, static options), so a second call with the same shapes and
    criterion (any threshold) compiles nothing.
    """
    options = SamplerOptions.build(num_steps=num_steps, init_scale=init_scale, exit_criterion=exit_criterion,
                                   exit_threshold=exit_threshold, kv_share=kv_share)
    sampler = decode.cached_sampler(config, options.static())
    prompts = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, prompt_len))
    return measure(sampler, params, prompts, max_new_tokens=max_new_tokens, options=options,
                   rng=jax.random.key(seed), repeats=repeats)
