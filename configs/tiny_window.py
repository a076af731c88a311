"""The extrapolation showcase: the tiny model with a 2-token attention window, solving strings 4x longer than trained.

python -m rdlm.train --config=configs/tiny_window.py --workdir=runs/tiny_window

The main job (configs/tiny.py) is exact Huginn. This config makes one deliberate deviation: every block
attends to a window of 2 tokens (itself and its predecessor), so information moves one position per
layer and a longer bit string needs more iterations of the core. It trains on parity problems of 1-8
bits only and solves 9-32 bits at r >= 32 (docs/miniature-effect.md has the recipe and its seeds).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section(
        "tiny", vocab_size=512, n_embd=64, n_heads=4, intermediate_size=128, block_size=128,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1, attention_window=2,
    )
    c.recurrence.mean = 8  # mean training r is 9 (r = Poisson + 1)
    c.recurrence.backprop = 4

    c.train.num_steps = 800  # the scan appears between steps 200 and 400: a 2x margin
    c.train.batch_size = 32

    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.weight_decay = 2e-5  # per step at peak lr: optax's adamw weight_decay=0.01 at lr 2e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.05
    c.optim.grad_clip = 1.0

    c.data.seq_len = 128
    c.data.builtin.vocab_size = 512
    c.data.builtin.tasks = "parity"
    c.data.builtin.task_fraction = 0.75  # of training tokens; the rest is stdlib code
    c.data.builtin.difficulties = tuple(range(1, 9))  # bits per training problem
    c.data.builtin.heldout_difficulties = tuple(range(1, 33))  # 9-32 bits: longer than any training string
    c.data.builtin.heldout_problems = 1024
    c.data.builtin.code_max_mb = 2.0  # ~1M code tokens: more than 800 steps use, and a 5 s build
    c.data.eval_batches = 4

    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    c.eval.every_steps = 0  # validation loss against r is part of the final table
    c.eval.batch_size = 64
    c.eval.difficulty_buckets = "1-4,5-8,9-16,17-32"
    return c
