"""The laptop run: a tiny recurrent-depth model on the built-in data (stdlib code + reasoning problems).

python -m rdlm.train --config=configs/tiny.py --workdir=runs/tiny
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section("tiny", vocab_size=4096, block_size=256)
    c.recurrence.mean = 8
    c.recurrence.backprop = 4
    c.train.num_steps = 300
    c.train.batch_size = 32
    c.optim.name = "adamw"
    c.optim.lr = 2e-3
    c.optim.weight_decay = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.05
    c.data.seq_len = 128
    c.data.builtin.vocab_size = 4096
    c.checkpoint.every_steps = 100
    c.log.every_steps = 10
    c.eval.every_steps = 100
    c.eval.num_steps = (1, 4, 8, 16)
    c.eval.batch_size = 64
    return c
