"""How good and how costly predictors are: recall curves, calibrated top-k, bytes and FLOPs.

Recall is measured per token and averaged over tokens:

* active recall at k: |top-k(scores) ∩ active| / |active| (a token with no active neuron
  counts as 1);
* mass recall at k: sum of |fc1 post-ReLU| over the top-k / sum over all neurons;
* thresholded: the neurons with score > 0 (probability > 0.5) as the set;
* heads: recall of the true top-``label_k`` heads (by output norm) within the predicted
  top-k (at k = label_k: the top-k overlap); head-norm mass recall at k.

Curves hold the value for every k = 1..n at once (one sort per token), so calibration reads
them off: the smallest k (a multiple of the kernel's block) whose recall reaches a target.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import OPTConfig

F32 = jnp.float32


def default_block_size(ffn_dim: int) -> int:
    """Neuron-count granularity of mlp_k: 128 (the kernels' block) from F = 4096 up, F / 32
    below (so a small model's densities are not quantized in 12.5% steps), at least 8."""
    return int(min(128, max(8, ffn_dim // 32)))


@jax.jit
def _mlp_curve_sums(scores: jax.Array, act: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """scores, act: [N, F]. Returns sums over tokens of (active recall at k, mass recall at k)
    for k = 1..F ([F] each), and of the thresholded (recall, density) ([2])."""
    act = act.astype(F32)
    active = (act > 0).astype(F32)
    order = jnp.argsort(-scores, axis=-1)
    act_sorted = jnp.take_along_axis(act, order, axis=-1)
    n_active = active.sum(-1, keepdims=True)
    mass = act.sum(-1, keepdims=True)
    rec = jnp.where(n_active > 0, jnp.cumsum(act_sorted > 0, axis=-1) / jnp.maximum(n_active, 1), 1.0)
    mrec = jnp.where(mass > 0, jnp.cumsum(act_sorted, axis=-1) / jnp.where(mass > 0, mass, 1.0), 1.0)
    pred = (scores > 0).astype(F32)
    t_rec = jnp.where(n_active[:, 0] > 0, (pred * active).sum(-1) / jnp.maximum(n_active[:, 0], 1), 1.0)
    return rec.sum(0), mrec.sum(0), jnp.stack([t_rec.sum(), pred.mean(-1).sum()])


def mlp_curves(scores, act, chunk: int = 4096) -> dict[str, np.ndarray]:
    """One layer's neuron curves. scores: [N, F] (predictor scores; pass the activations
    themselves for the oracle); act: [N, F] fc1 post-ReLU magnitudes. Returns
    {"active_recall": [F], "mass_recall": [F] (index k-1 = value at k), "threshold_recall",
    "threshold_density": floats, "active_fraction": float}."""
    n = scores.shape[0]
    rec = mrec = 0.0
    thr = np.zeros(2)
    active = 0.0
    for i in range(0, n, chunk):
        s, a = jnp.asarray(scores[i:i + chunk], F32), jnp.asarray(act[i:i + chunk])
        r, m, t = _mlp_curve_sums(s, a)
        rec, mrec, thr = rec + np.asarray(r), mrec + np.asarray(m), thr + np.asarray(t)
        active += float(jnp.sum(a > 0))
    return {"active_recall": rec / n, "mass_recall": mrec / n, "threshold_recall": float(thr[0] / n),
            "threshold_density": float(thr[1] / n), "active_fraction": active / (n * scores.shape[1])}


@functools.partial(jax.jit, static_argnames=("label_k",))
def _head_curve_sums(scores, norms, *, label_k):
    norms = norms.astype(F32)
    order = jnp.argsort(-scores, axis=-1)
    n_sorted = jnp.take_along_axis(norms, order, axis=-1)
    true_rank = jnp.argsort(jnp.argsort(-norms, axis=-1), axis=-1)  # 0 = largest norm
    in_label = (jnp.take_along_axis(true_rank, order, axis=-1) < label_k).astype(F32)
    hits = jnp.cumsum(in_label, axis=-1)  # [N, H]: true top-label_k heads among predicted top-k
    mass = jnp.cumsum(n_sorted, axis=-1) / jnp.maximum(norms.sum(-1, keepdims=True), 1e-30)
    return hits.sum(0) / label_k, mass.sum(0)


def head_curves(scores, norms, label_k: int) -> dict[str, np.ndarray]:
    """One layer's head curves. scores, norms: [N, H]. Returns [H] curves (index k-1 = at k):
    "label_recall" (share of the true top-label_k heads within the predicted top-k; at
    k = label_k this is the top-k overlap) and "mass_recall" (share of the heads' summed
    output norm within the predicted top-k)."""
    n = scores.shape[0]
    rec, mass = _head_curve_sums(jnp.asarray(scores, F32), jnp.asarray(norms), label_k=label_k)
    return {"label_recall": np.asarray(rec) / n, "mass_recall": np.asarray(mass) / n}


def calibrate_k(curve: np.ndarray, target: float, block: int = 1) -> int:
    """Smallest k, a multiple of ``block`` (or n), whose ``curve[k-1] >= target``; n if none."""
    n = len(curve)
    for k in list(range(block, n, block)) + [n]:
        if curve[k - 1] >= target:
            return k
    return n


def value_at(curve: np.ndarray, k: int) -> float:
    return float(curve[min(max(k, 1), len(curve)) - 1])


def label_k_for(num_heads: int, fraction: float) -> int:
    """Heads labelled important per token: round(fraction * H), at least 1."""
    return max(1, min(num_heads, int(round(fraction * num_heads))))


# ---- cost ---------------------------------------------------------------------------------------
def layer_weight_count(config: OPTConfig) -> int:
    """Weights a decoder layer reads per token (q/k/v/out, fc1/fc2, biases and LayerNorms)."""
    d, F = config.hidden_size, config.ffn_dim
    return 4 * d * d + 2 * d * F + 4 * d + F + d + 4 * d


def predictor_weight_count(config: OPTConfig, rank: int, head_rank: int) -> int:
    """Weights one layer's two predictors read per token: r (d + F) + F  +  rh (d + H) + H."""
    d, F, H = config.hidden_size, config.ffn_dim, config.num_attention_heads
    return rank * (d + F) + F + head_rank * (d + H) + H


def cost_fractions(config: OPTConfig, rank: int, head_rank: int, predictor_bytes: int = 2,
                   model_bytes: int = 2) -> dict[str, float]:
    """Predictor cost as a fraction of its dense layer: bytes (weights read per decode step)
    and FLOPs (2 per weight and token; attention-score FLOPs, which grow with context, left
    out, so this overstates the fraction)."""
    p, m = predictor_weight_count(config, rank, head_rank), layer_weight_count(config)
    return {"bytes_frac": p * predictor_bytes / (m * model_bytes), "flops_frac": p / m}
