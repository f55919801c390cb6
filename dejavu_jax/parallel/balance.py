"""Balance of the selected neurons and heads across tensor-parallel devices.

With the global top-k (`tp_sparse_decode(selection="global")`) device i runs the selected
units that fall in its contiguous block, a number that changes token to token; the step
waits for the busiest device, so its cost follows max / mean of the per-device counts (1.0
is perfect balance). This module measures that ratio and offers two remedies:

* per-device top-k (`selection="per_device"`, the default): balanced by construction;
* an offline permutation of the neurons (and heads) that deals them to the devices by how
  often they are selected (`balanced_permutation`, `permute_units`). The model computes the
  same function after the permutation (fc1 rows, b1, fc2 rows and the predictors' outputs
  move together), only the split over devices changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.predictors.modules import Predictors


# ---- measuring ----------------------------------------------------------------------------------
def imbalance(counts) -> np.ndarray:
    """max / mean over the last axis (devices) of selected counts [..., tp]; rows with nothing
    selected count as balanced (1.0)."""
    c = np.asarray(counts, np.float64)
    mean = c.mean(-1)
    return np.where(mean > 0, c.max(-1) / np.where(mean > 0, mean, 1.0), 1.0)


def summarize(counts) -> dict:
    """Selected counts [..., tp] -> the max/mean ratio's mean, 95th percentile and maximum over
    rows, and ``work_ratio`` = sum of max / sum of mean: the step time of the global top-k over
    that of a perfectly balanced split when each device's time follows its count (a row with
    few units selected weighs little)."""
    c = np.asarray(counts, np.float64).reshape(-1, np.shape(counts)[-1])
    r = imbalance(c)
    work = c.max(-1).sum() / max(c.mean(-1).sum(), 1e-12)
    return {"mean": float(r.mean()), "p95": float(np.percentile(r, 95)), "max": float(r.max()),
            "work_ratio": float(work), "n": int(r.size)}


def top_k_member(values: np.ndarray, k: int) -> np.ndarray:
    """[N, n] -> bool [N, n], True at each row's k largest entries (ties broken by index)."""
    idx = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    member = np.zeros(values.shape, bool)
    np.put_along_axis(member, idx, True, axis=-1)
    return member


def device_counts(member: np.ndarray, tp: int, perm: np.ndarray | None = None) -> np.ndarray:
    """Selected units per device. member: [N, n] bool in the model's unit order; ``perm`` (new
    position -> old unit, see `balanced_permutation`) lays the units out before the split."""
    if perm is not None:
        member = member[:, perm]
    N, n = member.shape
    return member.reshape(N, tp, n // tp).sum(-1)


def per_device_member(values: np.ndarray, k: int, tp: int) -> np.ndarray:
    """The per-device top-k selection: each of the tp contiguous blocks keeps ceil(k / tp)."""
    N, n = values.shape
    kl = min(n // tp, -(-k // tp))
    blocks = values.reshape(N * tp, n // tp)
    return top_k_member(blocks, kl).reshape(N, n)


def mass_recall(values: np.ndarray, member: np.ndarray) -> float:
    """Fraction of the units' total (ReLU activation or head-output norm) mass that the
    selection keeps, averaged over rows: what a selection loses."""
    v = np.maximum(values, 0)
    tot = v.sum(-1)
    return float(np.mean(np.where(tot > 0, (v * member).sum(-1) / np.where(tot > 0, tot, 1), 1.0)))


# ---- rebalancing ---------------------------------------------------------------------------------
def balanced_permutation(freq, tp: int) -> np.ndarray:
    """A unit order (new position -> old unit) that deals units to the tp devices in snake
    order of decreasing selection frequency, so every device gets a similar share of the
    frequently selected ones. freq: [n] (e.g. how often each unit was in the top-k)."""
    freq = np.asarray(freq, np.float64)
    n = freq.size
    order = np.argsort(-freq, kind="stable")
    r = np.arange(n)
    lane = np.where((r // tp) % 2 == 0, r % tp, tp - 1 - r % tp)
    return np.concatenate([np.sort(order[lane == dev]) for dev in range(tp)]).astype(np.int32)


def permute_units(model: M.OPTModel, predictors: Predictors | None = None, *, neuron_perms=None,
                  head_perms=None):
    """The same model with each layer's MLP neurons (``neuron_perms[l]``: new position -> old
    neuron) and attention heads (``head_perms[l]``) reordered, and the predictors' outputs
    with them. Outputs are unchanged (up to float summation order). Returns (model, predictors)."""
    L = model.config.num_hidden_layers
    layers = []
    for layer, lp in enumerate(model.params["layers"]):
        lp = {**lp, "attn": dict(lp["attn"]), "mlp": dict(lp["mlp"])}
        if neuron_perms is not None:
            p = jnp.asarray(neuron_perms[layer])
            for name in ("fc1", "b1", "fc2_t"):
                lp["mlp"][name] = jnp.take(lp["mlp"][name], p, axis=0)
        if head_perms is not None:
            p = jnp.asarray(head_perms[layer])
            lp["attn"]["wqkv"] = jnp.take(lp["attn"]["wqkv"], p, axis=1)
            lp["attn"]["bqkv"] = jnp.take(lp["attn"]["bqkv"], p, axis=1)
            lp["attn"]["wo_t"] = jnp.take(lp["attn"]["wo_t"], p, axis=0)
        layers.append(lp)
    model = dataclasses.replace(model, params={**model.params, "layers": layers})
    if predictors is None:
        return model, None
    changes = {}
    for perms, w2, b2 in ((neuron_perms, "mlp_w2", "mlp_b2"), (head_perms, "head_w2", "head_b2")):
        if perms is not None:
            idx = jnp.asarray(np.stack([np.asarray(perms[layer]) for layer in range(L)]))  # [L, n]
            changes[w2] = jnp.take_along_axis(getattr(predictors, w2), idx[:, None, :], axis=2)
            changes[b2] = jnp.take_along_axis(getattr(predictors, b2), idx, axis=1)
    return model, dataclasses.replace(predictors, **changes)


# ---- the reference model's own activations ---------------------------------------------------------
def layer_activations(model: M.OPTModel, tokens: np.ndarray, batch: int = 4):
    """Per layer, the MLP's ReLU outputs [N, F] and the heads' output norms [N, H] (f32 numpy)
    over every position of ``tokens`` [S, T] (`dejavu_jax.predictors.instrument`)."""
    from dejavu_jax.predictors.instrument import run_layers

    L = model.config.num_hidden_layers
    acts, norms = [[] for _ in range(L)], [[] for _ in range(L)]

    @jax.jit
    def one(params, toks):
        recs = {}
        run_layers(params, toks, model.config, on_layer=lambda l, r: recs.__setitem__(l, (r["mlp_act"], r["head_norm"])))
        return [recs[l] for l in range(L)]

    for i in range(0, len(tokens), batch):
        out = one(model.params, jnp.asarray(tokens[i:i + batch], jnp.int32))
        for l, (a, h) in enumerate(out):
            acts[l].append(np.asarray(a, np.float32).reshape(-1, a.shape[-1]))
            norms[l].append(np.asarray(h, np.float32).reshape(-1, h.shape[-1]))
    return [np.concatenate(a) for a in acts], [np.concatenate(h) for h in norms]


def oracle_balance(values: list[np.ndarray], k: int, tps, fit_fraction: float = 0.5) -> dict:
    """For one kind of unit (neurons or heads), per layer values [N, n]: with the oracle global
    top-k of each position (its positive entries: zeros are not selected), the imbalance across tp devices in the natural (contiguous) layout
    and after `balanced_permutation` fit on the first ``fit_fraction`` of the positions
    (measured on the rest); and the mass recall of the global vs the per-device top-k."""
    out = {}
    for tp in tps:
        nat, perm_r, rec_g, rec_d = [], [], [], []
        for v in values:
            cut = int(len(v) * fit_fraction)
            member = top_k_member(v, k) & (v > 0)  # a ReLU row may have fewer than k active units
            nat.append(device_counts(member[cut:], tp))
            perm = balanced_permutation(member[:cut].mean(0), tp)
            perm_r.append(device_counts(member[cut:], tp, perm))
            rec_g.append(mass_recall(v[cut:], member[cut:]))
            rec_d.append(mass_recall(v[cut:], per_device_member(v[cut:], k, tp)))
        out[str(tp)] = {"global_topk_imbalance": summarize(np.stack(nat)),
                        "global_topk_imbalance_per_layer": [float(imbalance(c).mean()) for c in nat],
                        "permuted_imbalance": summarize(np.stack(perm_r)),
                        "mass_recall_global_topk": float(np.mean(rec_g)),
                        "mass_recall_per_device_topk": float(np.mean(rec_d))}
    return out
