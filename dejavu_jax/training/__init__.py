"""Training an OPT from scratch: config, step (bf16 compute on f32 masters, AdamW), batches,
orbax checkpoints, the resumable loop, export to a Hugging Face directory, and the
reference-model pipeline (`dejavu_jax.training.reference`)."""

from dejavu_jax.training.config import (REFERENCE_NAME, TrainConfig, reference_model_config,
                                        tiny_model_config)
from dejavu_jax.training.loop import TrainResult, train

__all__ = ["REFERENCE_NAME", "TrainConfig", "reference_model_config", "tiny_model_config",
           "TrainResult", "train"]
