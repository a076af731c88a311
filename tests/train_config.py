"""A training config small enough for tests: a few-hundred-thousand-parameter model on a sliver of the built-in data
(configs/tiny_window.py's parity mix, the main job's data before it moved to s3)."""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import base, tiny_window  # noqa: E402


def small_config(cache_dir, **overrides):
    c = tiny_window.get_config()
    c.model = base.model_section("tiny", vocab_size=512, n_embd=32, n_heads=2, intermediate_size=64, block_size=64,
                                 n_layers_in_prelude=1, n_layers_in_recurrent_block=1, n_layers_in_coda=1)
    c.data.builtin.vocab_size = 448
    c.data.builtin.code_max_mb = 0.2
    c.data.builtin.tokenizer_train_mb = 0.3
    c.data.builtin.heldout_problems = 8
    c.data.cache_dir = str(cache_dir)
    c.data.seq_len = 32
    c.train.batch_size = 8
    c.train.num_steps = 6
    c.recurrence.mean = 3
    c.recurrence.backprop = 2
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 2
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    c.log.every_steps = 1
    c.log.peak_tflops = 1.0
    c.eval.every_steps = 0
    c.eval.batch_size = 8
    c.eval.num_steps = (1, 2)
    c.eval.final_num_steps = (1, 4)
    c.data.eval_batches = 1
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return c
