"""The paper's Table 4 in miniature: a fixed-depth model of about the tiny model's size, same data and budget.

python -m rdlm.train --config=configs/tiny_baseline.py --workdir=runs/tiny_baseline

Four distinct blocks run once (prelude 1, core 2, coda 1; r = 1 in training and at test time) with
full causal attention, the strongest fixed-depth competitor at this size; the MLP is narrowed so the
parameter count matches the recurrent model's.
"""

from configs import base, tiny


def get_config():
    c = tiny.get_config()
    c.model = base.model_section(
        "tiny", vocab_size=512, n_embd=64, n_heads=4, intermediate_size=72, block_size=128,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1,
    )
    c.recurrence.fixed = 1
    c.recurrence.mean = 1
    c.eval.final_num_steps = (1,)
    return c

