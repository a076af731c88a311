"""The recurrent-depth model: `ModelConfig` and the linen module `RecurrentLM`."""

from rdlm.model.config import PRESETS, ModelConfig
from rdlm.model.recurrence import sample_num_steps
from rdlm.model.transformer import RecurrentLM, RecurrentLMOutput

__all__ = ["PRESETS", "ModelConfig", "RecurrentLM", "RecurrentLMOutput", "sample_num_steps"]
