"""Perplexity with heads / neurons masked ("mask-only" mode, as the paper's accuracy code).

The dense forward runs in full and the outputs of heads / neurons outside the kept sets
are zeroed (`instrument.py`), per token:

* mode "oracle": the truly largest units (top-k fc1 activations, top-k head norms);
* mode "predictor": the top-k of the predictors' scores, each layer's predictors fed as in
  decoding (with lookahead, layer l's sets come from layer l-1's attention input).

This measures what the selections cost in quality, apart from kernel and KV-cache effects
(sparse_decode measures those on the real path).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.errors import InputError
from dejavu_jax.model import OPTModel
from dejavu_jax.predictors.instrument import oracle_selectors, run_layers, top_k_mask
from dejavu_jax.predictors.modules import Predictors, predict_head_scores, predict_mlp_scores

F32 = jnp.float32


def _predictor_selectors(pred: Predictors, mlp_k: tuple | None, head_k: tuple | None):
    def heads(l, norm, rec):
        x = rec["prev_attn_in"] if pred.lookahead else rec["attn_in"]
        return top_k_mask(predict_head_scores(pred, l, x), head_k[l])

    def neurons(l, act, rec):
        x = rec["prev_attn_in"] if pred.lookahead else rec["mlp_in"]
        return top_k_mask(predict_mlp_scores(pred, l, x), mlp_k[l])

    return (None if head_k is None else heads), (None if mlp_k is None else neurons)


@functools.partial(jax.jit, static_argnames=("config", "mode"))
def _nll_sum(params, pred, tokens, mlp_k, head_k, *, config, mode):
    """Per row, the sum of next-token NLL over tokens[:, 1:]: [B] f32. tokens: [B, T];
    mlp_k / head_k: [L] int32 (traced: one program serves every k) or None (keep all)."""
    if mode == "oracle":
        heads, neurons = oracle_selectors(mlp_k, head_k)
    elif mode == "predictor":
        heads, neurons = _predictor_selectors(pred, mlp_k, head_k)
    else:
        heads = neurons = None
    logits = run_layers(params, tokens, config, select_heads=heads, select_neurons=neurons)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(F32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(-1)


def per_layer(k, num_layers: int, limit: int, what: str) -> tuple[int, ...] | None:
    """None, an int, or one int per layer -> a per-layer tuple of ints in [1, limit] (or None)."""
    if k is None:
        return None
    ks = (int(k),) * num_layers if np.isscalar(k) else tuple(int(v) for v in k)
    if len(ks) != num_layers or not all(1 <= v <= limit for v in ks):
        raise InputError(f"{what} must be an int or {num_layers} ints in [1, {limit}]; got {k!r}.")
    return ks


def perplexity(model: OPTModel, windows: np.ndarray, *, mode: str = "dense", mlp_k=None, head_k=None,
               predictors: Predictors | None = None, batch_size: int = 8) -> float:
    """Perplexity over ``windows`` ([n, T] int32; every token but the first is predicted).

    mode "dense" | "oracle" | "predictor"; ``mlp_k`` / ``head_k``: neurons / heads kept per
    token (an int, or one per layer; None keeps all). Mode "predictor" needs ``predictors``
    and defaults the k's to theirs."""
    cfg = model.config
    if mode not in ("dense", "oracle", "predictor"):
        raise InputError(f"mode must be 'dense', 'oracle' or 'predictor', not {mode!r}.")
    if mode == "predictor":
        if predictors is None:
            raise InputError("mode='predictor' needs predictors.")
        mlp_k = predictors.mlp_k if mlp_k is None else mlp_k
        head_k = predictors.head_k if head_k is None else head_k
    mk = per_layer(mlp_k, cfg.num_hidden_layers, cfg.ffn_dim, "mlp_k")
    hk = per_layer(head_k, cfg.num_hidden_layers, cfg.num_attention_heads, "head_k")
    windows = np.asarray(windows, np.int32)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        real = len(batch)
        if real < batch_size:  # pad to one compiled shape; padded rows are not counted
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
        nll = _nll_sum(model.params, predictors if mode == "predictor" else None, jnp.asarray(batch),
                       None if mk is None else jnp.asarray(mk, jnp.int32),
                       None if hk is None else jnp.asarray(hk, jnp.int32), config=cfg, mode=mode)
        nll = float(np.asarray(nll)[:real].sum())
        total += nll
        count += real * (windows.shape[1] - 1)
    return float(np.exp(total / count))


def oracle_curve(model: OPTModel, windows: np.ndarray, densities: Sequence[float], *, unit: str = "mlp",
                 dense_layers: Sequence[int] = (), batch_size: int = 8) -> list[dict]:
    """Perplexity with the true top units kept, the same density in every layer but
    ``dense_layers`` (kept whole): unit "mlp" keeps round(density * F) neurons per token (heads
    dense), "heads" keeps ceil(density * H) heads (MLP dense). Returns [{"density", "k", "ppl"}]."""
    cfg = model.config
    n = cfg.ffn_dim if unit == "mlp" else cfg.num_attention_heads
    out = []
    for dens in densities:
        k = max(1, int(round(dens * n))) if unit == "mlp" else max(1, int(np.ceil(dens * n - 1e-9)))
        ks = tuple(n if l in dense_layers else k for l in range(cfg.num_hidden_layers))
        kw = {"mlp_k": ks} if unit == "mlp" else {"head_k": ks}
        out.append({"density": float(dens), "k": k,
                    "ppl": perplexity(model, windows, mode="oracle", batch_size=batch_size, **kw)})
    return out
