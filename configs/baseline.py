"""The paper's fixed-depth comparison (Table 4): huginn's shape, one pass through the core, 180B tokens."""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section("baseline")
    c.recurrence.fixed = 1  # n = 0, k = 1 on every step: 2 + 4 + 2 = 8 layers
    c.recurrence.mean = 1  # also the default depth at test time
    three_b5 = __import__("configs.3b5", fromlist=["get_config"]).get_config()
    for section in ("train", "optim", "data", "mesh", "checkpoint", "log", "eval"):
        c[section] = three_b5[section]
    c.train.num_steps = 10_729  # 180B tokens at 16.8M tokens per step
    c.eval.num_steps = (1,)
    c.eval.final_num_steps = (1,)
    return c
