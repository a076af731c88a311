"""Defaults for every field of a training run; the other configs start from here.

Override any field on the command line: `--config.train.num_steps=100 --config.model.n_embd=128`.
"""

import ml_collections
from ml_collections import config_dict

from rdlm import sharding
from rdlm.data import config as data_config
from rdlm.model.config import PRESETS, ModelConfig

# Recurrence is set in `config.recurrence`, not in `config.model`.
_RECURRENCE_FIELDS = ("mean_recurrence", "mean_backprop_depth")


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
    """`config.model`: every ModelConfig field, from a preset of the size table, with overrides."""
    fields = {k: v for k, v in vars(ModelConfig.preset(preset, **overrides)).items() if k not in _RECURRENCE_FIELDS}
    model = ml_collections.ConfigDict(fields)
    if fields["attention_window"] is None:
        model.attention_window = config_dict.placeholder(int)
    return model


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_from = ""  # Params-only start: an HF dir, an Orbax step dir or a workdir (ignored on resume).

    # Model shape and numerics: the ModelConfig fields (rdlm/model/config.py), from a preset of PRESETS.
    assert "tiny" in PRESETS
    c.model = model_section("tiny")

    # Depth per training step (paper section 3.1): r = Poisson(e^tau) + 1, tau ~ N(log mean - sigma^2/2, sigma).
    c.recurrence = ml_collections.ConfigDict()
    c.recurrence.mean = 8  # r-bar, the mean number of iterations (also the default at test time).
    c.recurrence.backprop = 4  # k-bar: the last min(k-bar, r) iterations get gradient.
    c.recurrence.sigma = 0.5  # Spread of the log-normal rate.
    c.recurrence.fixed = 0  # > 0: always run exactly this many iterations (all with gradient).
    c.recurrence.init_scale = 1.0  # Scale of the random initial state s0 in training (0 = zeros).

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000  # Optimizer steps.
    c.train.seed = 0  # Seeds init, the recurrence draws, the initial states and the data order.
    c.train.batch_size = 32  # Global sequences per optimizer step (over all processes and micro-batches).
    # Sequences per data-parallel device per micro-batch (MaxText's per_device_batch_size); 0 = not set.
    # When set, train.grad_accum_steps = batch_size / (per_device_batch x the mesh's data-parallel ways).
    c.train.per_device_batch = 0
    c.train.grad_accum_steps = 0  # Micro-batches per optimizer step (same r for all); 0 = derive (1 if unset).
    c.train.time_budget_minutes = 0.0  # > 0: stop training after this long (checkpoint, then evaluate).
    # > 0: the job's wall-clock limit in hours (e.g. the scheduler's), counted from the start of the run. The
    # run saves a checkpoint and exits 0 train.exit_minutes_before_limit before it; rerun to resume.
    c.train.max_hours = 0.0
    c.train.exit_minutes_before_limit = 5.0  # Margin kept for the final save (the reference's 5 minutes).
    # A step whose loss or gradient norm is not finite applies no update; then 'skip' counts it and goes
    # on, 'stop' ends the run. Either way no checkpoint ever holds a non-finite value.
    c.train.on_nonfinite = "skip"
    c.train.max_consecutive_nonfinite = 20  # 'skip' still stops after this many non-finite steps in a row.

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam_atan2"  # 'adam_atan2' (the paper's ELLISAdam) or 'adamw'.
    c.optim.lr = 4e-5  # Peak learning rate.
    c.optim.b1 = 0.9  # First-moment decay.
    c.optim.b2 = 0.95  # Second-moment decay.
    c.optim.eps = 1e-8  # AdamW only; adam_atan2 needs none.
    c.optim.weight_decay = 4e-5  # Fraction of each matrix removed per step at peak lr (decoupled).
    c.optim.grad_clip = 1.0  # Global gradient-norm clip; 0 turns it off.
    c.optim.schedule = "warmup_constant"  # 'warmup_constant' (paper), 'wsd' or 'cosine'.
    c.optim.warmup_steps = 4096  # Linear warm-up length.
    c.optim.decay_fraction = 0.2  # wsd: share of train.num_steps spent decaying at the end.
    c.optim.decay_shape = "linear"  # wsd: 'linear' or '1-sqrt'.
    c.optim.min_lr_ratio = 0.0  # wsd/cosine: final lr as a fraction of the peak.
    c.optim.update_clipping = True  # adam_atan2: divide each tensor's step by max(1, RMS(g^2/v)).
    c.optim.running_init = True  # adam_atan2: start the moments at m = g, v = g^2.
    # Parameters kept frozen (bit-identical): comma-separated 'prelude', 'core', 'coda' (with ln_f),
    # 'embedding', or regexes over '/'-joined names (e.g. 'attn/qk_bias$'); '' trains everything.
    c.optim.freeze = ""

    # Input pipeline (rdlm/data/config.py documents every field).
    c.data = data_config.get_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # Devices per axis of mesh.axis_names; one -1 takes the rest.
    c.mesh.axis_names = sharding.AXIS_NAMES
    c.mesh.dcn_shape = (1, 1, 1)  # Multi-slice TPU: slices per axis (a hybrid ICI/DCN mesh).
    # Logical axis name -> mesh axes. Parameters: vocab, embed, heads, head_dim, qkv, mlp, gate_up,
    # adapter, norm, layers. Activations: activation_batch/length/embed/mlp.
    c.mesh.rules = sharding.DEFAULT_RULES

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # Save every this many steps (and on SIGTERM, and at the end).
    c.checkpoint.keep = 3  # Newest verified checkpoints kept (older ones go only once a newer one is verified).
    c.checkpoint.async_save = True  # Write in the background while training goes on.

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # Train metrics to metrics.jsonl / TensorBoard / console.
    c.log.peak_tflops = 0.0  # Per-device peak for MFU; 0 measures a float32 matmul at start.
    c.log.loss_spike_factor = 3.0  # A loss above this times the running mean is logged as an event; 0 = off.
    c.log.loss_spike_window = 100  # Steps in the running mean of the loss.

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 500  # Validation loss during training; 0 turns it off.
    c.eval.num_steps = (1, 4, 8, 16, 32, 64)  # Test-time r for validation loss during training.
    # Tasks scored at every eval.num_steps each eval.every_steps (shipped names, .json specs or .jsonl
    # files, comma-separated, as `rdlm.evaluate --tasks`); their scores go to TensorBoard. '' = none.
    c.eval.tasks = ""
    c.eval.final_num_steps = (1, 2, 4, 8, 16, 32, 64)  # r of the final recurrence-scaling table.
    c.eval.batch_size = 32  # Global sequences per validation batch.
    c.eval.reasoning = True  # Final table: held-out reasoning accuracy per r (built-in data only).
    c.eval.difficulty_buckets = ""  # Table columns, e.g. '1-4,5-8,9-16'; '' = powers of two.
    c.eval.init_scale = 1.0  # Initial-state scale at evaluation (the reference's default draw).
    c.eval.seed = 1234  # Seeds the initial states drawn at evaluation.

    # python -m rdlm.bench (any config can be benchmarked; configs/bench_cpu.py is the reference shape).
    c.bench = ml_collections.ConfigDict()
    c.bench.num_steps = (24, 8)  # train: (n, k), n iterations without gradient, then k with.
    c.bench.steps = 10  # train: timed steps after warm-up (the median is reported).
    c.bench.warmup_steps = 2  # train: untimed steps after the compile.
    c.bench.sweep_n = (0, 4, 12, 24, 56, 120)  # sweep: n at the bench's k (r = n + k from 8 to 128).
    c.bench.sweep_steps = 3  # sweep: timed steps per n.
    c.bench.prompt_len = 32  # generate: tokens per prompt.
    c.bench.new_tokens = 32  # generate: tokens generated after each prompt.
    c.bench.gen_num_steps = 16  # generate: core iterations per token (r) unless --num_steps is given.
    c.bench.gen_prompts = 8  # generate: prompts per timed pass (a multiple of --batch).
    c.bench.gen_repeats = 5  # generate: timed passes after the warm-up (rounds with --compare; medians reported).
    c.bench.gen_init_scale = 0.0  # generate: initial-state scale; 0 (zero state) makes greedy tokens deterministic.
    c.bench.seed = 0  # Params, data and initial states.
    return c
