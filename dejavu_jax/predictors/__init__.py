"""Deja Vu's contextual-sparsity predictors: collect activations, analyze, train, evaluate.

    acts = collect_activations(model, tokens, "runs/acts")          # dense model's activations
    pred = train_predictors(model, "runs/acts", rank=64)             # per-layer MLP + head predictors
    save_predictors(pred, "models/ref/predictors", model.config)
    pred = load_predictors("models/ref", model)                      # refuses another model's
    scores = predict_mlp_scores(pred, layer, x)                      # [B, F] f32, under jit

Modules: `collect` (recording, shards), `modules` (Flax predictors, `Predictors`),
`train` (optax training, calibration), `metrics` / `evaluate` (recall, cost),
`analysis` / `masked_eval` (oracle analysis, mask-only perplexity), `saving` (orbax),
`pipeline` (everything in one call).
"""

from dejavu_jax.predictors.collect import collect_activations
from dejavu_jax.predictors.modules import (LowRankScorer, Predictors, config_fingerprint, predict_head_indices,
                                           predict_head_scores, predict_mlp_indices, predict_mlp_scores,
                                           predictor_input_layer, random_predictors)
from dejavu_jax.predictors.saving import load_predictors, save_predictors
from dejavu_jax.predictors.train import TrainSettings, fit_predictors, train_predictors

__all__ = [
    "LowRankScorer", "Predictors", "TrainSettings", "collect_activations", "config_fingerprint", "fit_predictors",
    "load_predictors", "predict_head_indices", "predict_head_scores", "predict_mlp_indices", "predict_mlp_scores",
    "predictor_input_layer", "random_predictors", "save_predictors", "train_predictors",
]
