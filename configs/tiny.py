"""The laptop run: a 165k-parameter recurrent-depth model that learns to think longer on a 2-core CPU.

python -m rdlm.train --config=configs/tiny.py --workdir=runs/tiny

It trains on the built-in data (stdlib code + parity problems, nothing downloaded) and ends with
held-out accuracy against test-time r. The recipe and the experiments behind it are in
docs/miniature-effect.md. One deliberate deviation from Huginn: every block attends to a window of
2 tokens (itself and its predecessor), so information moves one position per layer and a longer
bit string needs more iterations of the core, which is what makes the effect visible at this size.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section(
        "tiny", vocab_size=512, n_embd=64, n_heads=4, intermediate_size=128, block_size=128,
        n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1,
    )
    c.recurrence.mean = 8  # mean training r is 9 (r = Poisson + 1)
    c.recurrence.backprop = 4

    c.train.num_steps = 1100
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
    c.data.builtin.tasks = "parity,s3"
    c.data.builtin.task_fraction = 0.75  # of training tokens; the rest is stdlib code
    c.data.builtin.difficulties = 2 * tuple(range(1, 9)) + tuple(range(9, 17))  # 1-8 weighted twice
    c.data.builtin.heldout_difficulties = tuple(range(1, 33))  # 17-32: longer than any training string
    c.data.builtin.heldout_problems = 1024
    c.data.builtin.code_max_mb = 2.0  # ~1M code tokens: more than 800 steps use, and a 5 s build
    c.data.eval_batches = 4

    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    c.eval.every_steps = 0  # validation loss against r is part of the final table
    c.eval.batch_size = 64
    c.eval.difficulty_buckets = "1-4,5-8,9-16,17-32"
    return c
