"""The paper's run: huginn-0125's shape and recipe (spec sections 1 and 3).

python -m rdlm.train --config=configs/3b5.py --workdir=gs://BUCKET/huginn \
    --config.data.paths='gs://BUCKET/huginn-dataset/*.parquet'
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_section("3b5")  # 3,564,976,800 parameters, bf16 compute, float32 master weights
    c.model.remat_policy = "nothing_saveable"
    c.recurrence.mean = 32  # r-bar
    c.recurrence.backprop = 8  # k: truncated backprop through the last 8 iterations

    c.train.num_steps = 47_360  # the released checkpoint's step: ~795B tokens
    c.train.batch_size = 4096  # sequences per step: 4096 x 4096 = 16.8M tokens
    c.train.per_device_batch = 1  # one 4096-token sequence per device per micro-batch: 32 chips accumulate 128
    c.train.seed = 0

    c.optim.name = "adam_atan2"
    c.optim.lr = 4e-5
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 4e-5  # not on norms or q/k biases (rdlm.optim.weight_decay_mask)
    c.optim.grad_clip = 1.0
    c.optim.schedule = "warmup_constant"
    c.optim.warmup_steps = 4096
    c.optim.update_clipping = True
    c.optim.running_init = True

    # The released pre-tokenised corpus (tomg-group-umd/huginn-dataset): parquet shards of token ids.
    c.data.source = "parquet"
    c.data.paths = ""  # set on the command line, e.g. gs://BUCKET/huginn-dataset/*.parquet
    c.data.parquet_column = "input_ids"
    c.data.seq_len = 4096
    c.data.bos_id = 65504  # <|begin_text|>
    c.data.eos_id = 65505  # <|end_text|>
    c.data.pad_id = 65509  # <|pad|>
    c.data.append_eos = False
    c.data.eval_documents = 2048
    c.data.worker_count = 4

    c.mesh.shape = (1, -1, 1)  # FSDP over every chip; set (data, fsdp, tensor) for larger pods
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 3
    c.log.every_steps = 10
    c.log.peak_tflops = 0.0  # set the chip's bf16 peak (e.g. 459 for v5p) for a meaningful MFU
    c.eval.every_steps = 1000
    c.eval.batch_size = 256
    c.eval.num_steps = (1, 4, 8, 16, 32, 64)
    c.eval.final_num_steps = (1, 4, 8, 16, 32, 64)
    c.eval.reasoning = False
    return c
