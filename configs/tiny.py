"""The laptop run: a 165k-parameter recurrent-depth model, exactly Huginn, that learns to think longer on a 2-core CPU.

python -m rdlm.train --config=configs/tiny.py --workdir=runs/tiny

It trains on the built-in data (stdlib code + `s3` word problems, nothing downloaded) and ends with
held-out accuracy against test-time r. Attention is Huginn's: full causal attention in every block.
The key to the effect at this size is the mix: problems of 1-8 operations twice as often as 9-16, so
that the short ones are learned first and the core's step is then reused for the long ones.
docs/miniature-effect.md has the recipe, its seeds (`python -m rdlm.seeds`) and what failed;
configs/tiny_window.py is the windowed extrapolation showcase.
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
    c.data.builtin.tasks = "s3"  # no counting shortcut, unlike parity under full attention
    c.data.builtin.task_fraction = 0.75  # of training tokens; the rest is stdlib code
    c.data.builtin.difficulties = 2 * tuple(range(1, 9)) + tuple(range(9, 17))  # 1-8 weighted twice
    c.data.builtin.heldout_difficulties = tuple(range(1, 33))  # 17-32: longer than any training string
    c.data.builtin.heldout_problems = 1024
    c.data.builtin.code_max_mb = 2.0  # ~1M code tokens, a quarter of one pass over the data, and a 5 s build
    c.data.eval_batches = 4

    c.checkpoint.every_steps = 200
    c.log.every_steps = 20
    c.eval.every_steps = 0  # validation loss against r is part of the final table
    c.eval.batch_size = 64
    c.eval.difficulty_buckets = "1-4,5-8,9-16,17-32"
    return c
