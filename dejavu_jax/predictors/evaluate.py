"""Evaluate Predictors on held-out activations: per-layer recall, mass recall, head overlap, cost.

`evaluate_predictors` returns one record per layer (the fields of
``benchmarks/results/predictors.json``) plus the full curves for plots. Recall definitions
are in `metrics.py`; the oracle's mass recall at the same k (the true top-k by magnitude)
is reported beside the predictor's, so the gap the predictor adds is visible.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import InputError
from dejavu_jax.predictors import metrics as MT
from dejavu_jax.predictors.modules import Predictors, config_fingerprint
from dejavu_jax.predictors.shards import ActivationSet
from dejavu_jax.predictors.train import _scores_np, load_layer_data

DENSITIES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def _stacked(pred: Predictors, kind: str, layers: list[int]) -> dict:
    w1, w2, b2 = (pred.mlp_w1, pred.mlp_w2, pred.mlp_b2) if kind == "mlp" else (pred.head_w1, pred.head_w2, pred.head_b2)
    return {"w1": w1[jnp.asarray(layers)], "w2": w2[jnp.asarray(layers)], "b2": b2[jnp.asarray(layers)]}


def evaluate_predictors(pred: Predictors, activations, config: OPTConfig, *, head_label_frac: float = 0.3,
                        densities=DENSITIES, max_positions: int | None = None,
                        layer_group: int | None = None) -> dict:
    """Score ``pred`` on the held-out split of a collection (a directory or an ActivationSet).

    Returns {"layers": [per-layer record], "curves": [per-layer {"mlp": predictor curves,
    "oracle_mass": [F], "heads": head curves}]}. Record fields: layer, lookahead, mlp_k,
    mlp_density, mlp_recall, mlp_mass_recall (at mlp_k), oracle_mass_recall (true top-mlp_k),
    mlp_threshold_recall / _density, active_fraction, recall_at / mass_recall_at (per
    density), head_k, head_keep, head_recall (true top-label_k within the predicted top-head_k),
    head_overlap (at k = label_k), head_mass_recall, predictor_bytes_frac, predictor_flops_frac.
    """
    acts = activations if isinstance(activations, ActivationSet) else ActivationSet(activations, "heldout")
    if acts.fingerprint != config_fingerprint(config) or pred.fingerprint != config_fingerprint(config):
        raise InputError("the activations, the predictors and the config must all belong to one model "
                         f"(fingerprints {acts.fingerprint}, {pred.fingerprint}, {config_fingerprint(config)}).")
    L, F, H = config.num_hidden_layers, config.ffn_dim, config.num_attention_heads
    label_k = MT.label_k_for(H, head_label_frac)
    cost = MT.cost_fractions(config, pred.rank, pred.head_rank)
    group = layer_group or L
    records, curves = [], []
    for g0 in range(0, L, group):
        layers = list(range(g0, min(L, g0 + group)))
        data = load_layer_data(acts, layers, pred.lookahead, max_positions)
        data["mlp_act"] = acts.load("mlp_act", layers, max_positions)
        mlp_scores = _scores_np(_stacked(pred, "mlp", layers), data["x_mlp"])
        head_scores = _scores_np(_stacked(pred, "head", layers), data["x_head"])
        for j, l in enumerate(layers):
            act = data["mlp_act"][j]
            mc = MT.mlp_curves(mlp_scores[j], act)
            oracle = MT.mlp_curves(act.astype(np.float32), act)["mass_recall"]
            hc = MT.head_curves(head_scores[j], data["head_norm"][j], label_k)
            mk, hk = pred.mlp_k[l], pred.head_k[l]
            records.append({
                "layer": l, "lookahead": pred.lookahead,
                "mlp_k": mk, "mlp_density": mk / F,
                "mlp_recall": MT.value_at(mc["active_recall"], mk),
                "mlp_mass_recall": MT.value_at(mc["mass_recall"], mk),
                "oracle_mass_recall": MT.value_at(oracle, mk),
                "mlp_threshold_recall": mc["threshold_recall"], "mlp_threshold_density": mc["threshold_density"],
                "active_fraction": mc["active_fraction"],
                "recall_at": {f"{d:g}": MT.value_at(mc["active_recall"], round(d * F)) for d in densities},
                "mass_recall_at": {f"{d:g}": MT.value_at(mc["mass_recall"], round(d * F)) for d in densities},
                "head_k": hk, "head_keep": hk / H, "head_label_k": label_k,
                "head_recall": MT.value_at(hc["label_recall"], hk),
                "head_overlap": MT.value_at(hc["label_recall"], label_k),
                "head_mass_recall": MT.value_at(hc["mass_recall"], hk),
                "predictor_bytes_frac": cost["bytes_frac"], "predictor_flops_frac": cost["flops_frac"],
            })
            curves.append({"mlp": mc, "oracle_mass": oracle, "heads": hc})
    return {"layers": records, "curves": curves, "positions": int(data["bits"].shape[1])}


def summarize(records: list[dict]) -> dict:
    """Means over layers of the main figures, and over layers 1.. (the paper's targets skip layer 0)."""
    keys = ("mlp_density", "mlp_recall", "mlp_mass_recall", "oracle_mass_recall", "head_keep", "head_recall",
            "head_overlap", "head_mass_recall")
    out = {f"mean_{k}": float(np.mean([r[k] for r in records])) for k in keys}
    rest = records[1:] or records
    out["min_mlp_mass_recall_excl_layer0"] = float(min(r["mlp_mass_recall"] for r in rest))
    out["min_mlp_recall_excl_layer0"] = float(min(r["mlp_recall"] for r in rest))
    return out


def mass_recall_at_density(curves: list[dict], density: float) -> list[float]:
    """Per layer, the predictor's mass recall at one density (e.g. where the oracle loses 1%)."""
    if not curves:
        raise InputError("no curves to read.")
    return [MT.value_at(c["mlp"]["mass_recall"], round(density * len(c["mlp"]["mass_recall"]))) for c in curves]
