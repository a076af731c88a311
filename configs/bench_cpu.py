"""The benchmark shape: a small huginn-like model at the paper's operating point (r = 32: n = 24, k = 8).

python -m rdlm.bench train --config=configs/bench_cpu.py
"""

import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section(
        "tiny",
        n_embd=256,
        n_heads=4,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
        intermediate_size=704,
        vocab_size=8192,
        block_size=256,
        dtype="float32",
        param_dtype="float32",
        # Fastest on a 2-core CPU (docs/performance.md): matmul outputs are kept, only elementwise work is
        # recomputed in the backward pass. The default, nothing_saveable, is about 15% slower here.
        remat_policy="dots_saveable",
    )
    c.recurrence.mean = 32
    c.recurrence.backprop = 8
    c.train.batch_size = 4
    c.data.seq_len = 256
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10

    c.bench = ml_collections.ConfigDict()
    c.bench.num_steps = (24, 8)  # train: (n, k), n iterations without gradient, then k with.
    c.bench.steps = 10  # train: timed steps after warm-up (the median is reported).
    c.bench.warmup_steps = 2  # train: untimed steps after the compile.
    c.bench.sweep_n = (0, 4, 12, 24, 56, 120)  # sweep: n at the bench's k (r = n + k from 8 to 128).
    c.bench.sweep_steps = 3  # sweep: timed steps per n.
    c.bench.prompt_len = 32  # generate: tokens per prompt.
    c.bench.new_tokens = 32  # generate: tokens generated after each prompt.
    c.bench.gen_num_steps = 16  # generate: core iterations per token (r) unless --num_steps is given.
    c.bench.gen_prompts = 8  # generate: prompts per timed pass (a multiple of --batch).
    c.bench.gen_repeats = 5  # generate: timed passes after the warm-up (rounds with --compare; medians reported).
    c.bench.gen_init_scale = 0.0  # generate: initial-state scale; 0 (zero state) makes greedy tokens deterministic.
    c.bench.seed = 0  # Params, data and initial states.
    return c
