"""Sampling from recurrent-depth models: KV-cached decoding with adaptive per-token exit, KV sharing,
continuous chain-of-thought, self-speculative decoding and the parallel (diffusion-forcing) sampler."""

from rdlm.sampling.cache import KVCache
from rdlm.sampling.decode import GenerateOutput, Sampler, SamplingState, generate
from rdlm.sampling.exits import CRITERIA, DEFAULT_THRESHOLDS, ExitCriterion, make_criterion, parse_exit
from rdlm.sampling.options import Knobs, SamplerOptions
from rdlm.sampling.parallel import ParallelOutput, ParallelSampler, ParallelSettings, generate_parallel
from rdlm.sampling.speculative import SpeculativeOutput, SpeculativeSampler, generate_speculative

__all__ = [
    "CRITERIA",
    "DEFAULT_THRESHOLDS",
    "ExitCriterion",
    "GenerateOutput",
    "KVCache",
    "Knobs",
    "ParallelOutput",
    "ParallelSampler",
    "ParallelSettings",
    "Sampler",
    "SamplerOptions",
    "SamplingState",
    "SpeculativeOutput",
    "SpeculativeSampler",
    "generate",
    "generate_parallel",
    "generate_speculative",
    "make_criterion",
    "parse_exit",
]
