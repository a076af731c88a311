"""The frozen model configuration and its size presets."""

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

ATTENTION_IMPLS = ("xla", "cudnn", "splash")
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a recurrent-depth LM; the field names follow Huginn's `config.json`."""

    vocab_size: int = 65536
    n_embd: int = 5280
    n_heads: int = 55
    intermediate_size: int = 17920
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    block_size: int = 4096  # rows of the RoPE table: the longest sequence the model accepts
    rope_base: float = 50_000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True
    mean_recurrence: int = 32  # r-bar: mean iterations in training, the default at test time
    mean_backprop_depth: int = 8  # k: iterations with gradient in training
    # rdlm extension, not in Huginn: each query sees keys 0 <= q - k < window; None = full causal.
    attention_window: int | None = None
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters (float32 master weights)
    attention_impl: str = "xla"  # "xla" (any backend), "cudnn" (GPU flash attention) or "splash" (TPU Pallas)
    remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps; REMAT_POLICIES
    unroll_layers: bool = False  # unroll the nn.scan over each stage's layers (slower on CPU: docs/performance.md)

    def __post_init__(self):
        if self.n_embd % self.n_heads:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_heads={self.n_heads}.")
        if (self.n_embd // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.n_embd // self.n_heads} must be even for RoPE pairs.")
        for field in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda"):
            if getattr(self, field) < 0 or (field == "n_layers_in_recurrent_block" and getattr(self, field) < 1):
                raise ValueError(f"{field}={getattr(self, field)} is out of range.")
        if self.attention_window is not None and self.attention_window < 1:
            raise ValueError(f"attention_window={self.attention_window} must be None or >= 1.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}.")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{field}={getattr(self, field)!r} must be float32, bfloat16 or float16.")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    @property
    def effective_expected_depth(self) -> int:
        """Layers run at the mean recurrence; it sets the out-projection init."""
        return self.n_layers_in_prelude + self.n_layers_in_coda + self.n_layers_in_recurrent_block * self.mean_recurrence

    @property
    def init_std(self) -> float:
        return math.sqrt(2 / (5 * self.n_embd))

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2 * self.effective_expected_depth)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named size from `PRESETS`, with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
        fields = {**PRESETS[name], **overrides}
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown ModelConfig field(s) {sorted(unknown)} in preset {name!r}.")
        return cls(**fields)


# One table of sizes. `3b5` is huginn-0125 exactly; `baseline` is the paper's fixed-depth comparison
# (same shape, one pass through the core); `tiny` runs on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "3b5": dict(dtype="bfloat16"),
    "baseline": dict(dtype="bfloat16", mean_recurrence=1, mean_backprop_depth=1),
    "tiny": dict(
        vocab_size=512,
        n_embd=64,
        n_heads=4,
        intermediate_size=160,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
        block_size=128,
        mean_recurrence=8,
        mean_backprop_depth=4,
    ),
}


_HF_FIELDS = (
    "vocab_size",
    "n_embd",
    "n_heads",
    "intermediate_size",
    "n_layers_in_prelude",
    "n_layers_in_recurrent_block",
    "n_layers_in_coda",
    "block_size",
    "rope_base",
    "norm_eps",
    "qk_bias",
    "mean_recurrence",
    "mean_backprop_depth",
)


def from_hf_config(hf: dict[str, Any], **overrides) -> ModelConfig:
    """The ModelConfig of a Huginn `config.json` (its dict), refusing variants rdlm does not implement."""
    unsupported = {
        "tie_embeddings": True,
        "injection_type": "linear",
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "bias": False,
    }
    for key, supported in unsupported.items():
        if key in hf and hf[key] != supported:
            raise ValueError(f"config.json has {key}={hf[key]!r}; rdlm only implements {key}={supported!r}.")
    if hf.get("test_time_noise", 0):
        raise ValueError(f"config.json has test_time_noise={hf['test_time_noise']}; rdlm only implements 0.")
    n_heads = hf.get("n_heads", hf.get("num_attention_heads"))
    if n_heads is None:
        raise ValueError("config.json has neither n_heads nor num_attention_heads.")
    kv_heads = hf.get("num_key_value_heads", n_heads)
    if kv_heads != n_heads:
        raise ValueError(f"config.json has num_key_value_heads={kv_heads} != n_heads={n_heads}; GQA is not implemented.")
    fields = {"n_heads": n_heads}
    vocab = hf.get("padded_vocab_size", hf.get("vocab_size"))
    if vocab is not None:
        fields["vocab_size"] = vocab
    for key in _HF_FIELDS:
        if key in hf and key not in fields:
            fields[key] = hf[key]
    missing = [k for k in ("n_embd", "intermediate_size") if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks the required field(s) {missing}.")
    fields["rope_base"] = float(fields.get("rope_base", 50_000.0))
    if hf.get("torch_dtype") == "bfloat16":
        fields.setdefault("dtype", "bfloat16")
    fields.update(overrides)
    return ModelConfig(**fields)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """A Huginn `config.json` dict that the reference code (RavenConfig) loads."""
    return {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {
            "AutoConfig": "raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM",
        },
        "model_type": "huginn_raven",
        "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock",
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "injection_type": "linear",
        "init_strategy": "takase",
        "state_init": "like-init",
        "sampling_scheme": "poisson-lognormal-filling",
        "bias": False,
        "tie_embeddings": True,
        "test_time_noise": 0,
        "test_time_noise_type": "fixed",
        "n_layers": config.n_layers_in_prelude + config.n_layers_in_recurrent_block + config.n_layers_in_coda,
        "head_dim": config.head_dim,
        "num_key_value_heads": config.n_heads,
        "padded_vocab_size": config.vocab_size,
        "padding_multiple": 1,
        "effective_expected_depth": config.effective_expected_depth,
        "torch_dtype": config.param_dtype,
        **{key: getattr(config, key) for key in _HF_FIELDS},
    }
