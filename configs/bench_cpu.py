"""The benchmark shape: a small huginn-like model at the paper's operating point (r = 32: n = 24, k = 8).

python -m rdlm.bench train --config=configs/bench_cpu.py
"""

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

    return c
