"""Chat fine-tuning (SFT) of a recurrent-depth model, keeping what makes it one: randomized depth and truncated backprop.

    python -m rdlm.data.prepare --format=chat --input='conv/*.jsonl' --tokenizer=CHECKPOINT/tokenizer.json \
        --output_dir=data/chat
    python -m rdlm.train --config=configs/sft.py:CHECKPOINT --workdir=runs/sft \
        --config.data.paths='data/chat/*.array_record' [--config.optim.freeze=prelude,coda]

CHECKPOINT is what to start from: a converted huginn-0125 (`python -m rdlm.interop.convert to-orbax`), an HF
directory or an rdlm workdir, local or gs://. The model section, r-bar and k-bar are read from it and it becomes
`init_from`; a model of another shape than the config is refused in one sentence. The argument may instead
name a config of configs/ (`configs/sft.py:3b5`), with `--config.init_from=...` given separately.

The reference's advice for fine-tuning huginn: keep the paper's depth sampling (r = Poisson(e^tau) + 1
around r-bar) and truncated backpropagation through the last k iterations, and train on the assistant's
tokens only (the loss mask of `--format=chat`). `recurrence.mean` may be lowered for a cheaper fine-tune.
Checkpointing, resume (rerun the same command), validation loss against r and `eval.tasks` are those of
pre-training; `python -m rdlm.interop.convert to-hf runs/sft OUT` exports the result in huginn's layout.
"""

import importlib
import importlib.util

from configs import base


def _from_checkpoint(path: str):
    from rdlm import checkpoint_io

    model = checkpoint_io.model_config_of(path)
    c = base.get_config()
    c.model = base.model_section("tiny", **{k: v for k, v in vars(model).items()
                                            if k not in ("mean_recurrence", "mean_backprop_depth")})
    c.recurrence.mean = model.mean_recurrence
    c.recurrence.backprop = model.mean_backprop_depth
    c.init_from = path
    return c


def get_config(arg: str = "tiny"):
    name = arg.strip() or "tiny"
    if name.isidentifier() and importlib.util.find_spec(f"configs.{name}") is not None:
        c = importlib.import_module(f"configs.{name}").get_config()
        c.init_from = ""  # Set it: --config.init_from=CHECKPOINT (a model of this config's shape).
    else:
        c = _from_checkpoint(name)

    c.train.num_steps = 200  # Optimizer steps of the fine-tune.
    c.train.batch_size = 32
    c.train.grad_accum_steps = 0

    # Depth as in pre-training (paper section 3.1): r = Poisson(e^tau) + 1 around recurrence.mean, gradient
    # through the last recurrence.backprop iterations only. Lower recurrence.mean for a cheaper fine-tune.
    c.recurrence.fixed = 0

    c.optim.name = "adamw"
    c.optim.lr = 1e-5  # Peak learning rate (fine-tuning: well below pre-training's).
    c.optim.weight_decay = 0.0
    c.optim.schedule = "warmup_constant"  # Or 'wsd' (constant, then decay over optim.decay_fraction) or 'cosine'.
    c.optim.warmup_steps = 20  # A short linear warm-up.
    c.optim.decay_fraction = 0.2
    c.optim.min_lr_ratio = 0.0
    c.optim.freeze = ""  # E.g. 'prelude,coda' or a regex over parameter names; frozen ones stay bit-identical.

    c.data.source = "arrayrecord"
    c.data.paths = ""  # Chat shards of rdlm.data.prepare --format=chat, e.g. 'data/chat/*.array_record'.
    c.data.eval_paths = ""  # Held-out chat shards; '' holds out data.eval_documents conversations.
    c.data.eval_documents = 64
    c.data.tokenizer = ""  # Taken from the shards' metadata.json (the tokenizer they were made with).
    c.data.seq_len = min(c.model.block_size, 4096)

    c.checkpoint.every_steps = 50
    c.eval.every_steps = 50  # Validation loss against eval.num_steps during the fine-tune.
    c.eval.reasoning = False  # Chat data has no built-in problems; score tasks with eval.tasks or rdlm.evaluate.
    return c
