"""Per-device contextual-sparse decode step (inside `jax.shard_map` over ``"tp"``).

Each device scores only its own neurons and heads (the predictors' output layers are split
like the weights, so scoring needs no communication), picks a set, runs
`dejavu_jax.sparse.sparse_attention` / `pallas_kernels.sparse_mlp.sparse_mlp` on its shard
(the kernels' ``impl`` dispatch picks the backend per device), and the partial outputs are
summed with one psum after attention and one after the MLP, as in the dense layer.

Two ways to choose the sets (``selection``):

* ``"per_device"`` (balanced): each device keeps the top ceil(k / tp) of its own scores
  (rounded up to the block size, at most its F/tp neurons; heads: ceil(k_h / tp)). Every
  device reads the same number of rows, so no device waits for a busier one. The union of
  the devices' sets is not the global top-k: a device whose neurons score high everywhere
  keeps only its share.
* ``"global"``: the global top-k (the set single-device `sparse_decode` picks). The scores
  are all-gathered (n floats per row, tiny), each device runs the members that fall in its
  range: between 0 and min(k, F/tp) of them, a count that varies token to token. Static
  shapes reserve min(k, F/tp) slots, and the kernels skip the slots past the count.
  The per-device counts come back in the statistics, to measure the imbalance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dejavu_jax import model as M
from dejavu_jax.parallel.layers import embed_local, psum, reduce_out, tp_dense_attention_step, tp_mlp
from dejavu_jax.parallel.mesh import AXIS, LocalView
from dejavu_jax.predictors.modules import predict_head_scores, predict_mlp_scores
from dejavu_jax.sparse import select, sparse_attention
from pallas_kernels.sparse_mlp import sparse_mlp, sparse_mlp_masked

F32 = jnp.float32
SELECTIONS = ("per_device", "global")


def local_budgets(budgets, config, tp: int, block: int):
    """Per-device (mlp_k, head_k) of the "per_device" selection from the global budgets."""
    mlp_k, head_k = budgets
    F_l, H_l = config.ffn_dim // tp, config.num_attention_heads // tp
    mk = tuple(min(F_l, max(block, math.ceil(math.ceil(k / tp) / block) * block)) for k in mlp_k)
    hk = tuple(min(H_l, max(1, math.ceil(k / tp))) for k in head_k)
    return mk, hk


def select_global(local_scores, k: int, block: int, threshold=None):
    """The members of the global top-k (per row; B > 1: the union) in this device's range.
    local_scores: [B, n_l]. Returns (idx [cap] int32 local, count int32, row_mask [B, cap] or
    None), cap = min(n_l, the global static cap of `select`)."""
    B, n_l = local_scores.shape
    full = jax.lax.all_gather(local_scores, AXIS, axis=1, tiled=True)  # [B, n]
    n = full.shape[1]
    top_vals, top_idx = jax.lax.top_k(full, k)
    keep = True if threshold is None else top_vals > threshold
    member = jnp.zeros((B, n), bool).at[jnp.arange(B)[:, None], top_idx].set(keep)
    member = jax.lax.dynamic_slice_in_dim(member, jax.lax.axis_index(AXIS) * n_l, n_l, axis=1)
    union = member.any(0)
    global_cap = k if B == 1 else min(n, max(k, math.ceil(min(B * k, n) / block) * block))
    cap = min(n_l, global_cap)
    idx = jnp.nonzero(union, size=cap, fill_value=0)[0].astype(jnp.int32)
    count = jnp.sum(union).astype(jnp.int32)
    row_mask = None if B == 1 else member[:, idx] & (jnp.arange(cap) < count)[None]
    return idx, count, row_mask


def _choose(scores, k_global, k_local, block, threshold, selection):
    if selection == "global":
        return select_global(scores, k_global, block, threshold)
    return select(scores, k_local, block, threshold)


def _head_mask(heads, count, row_mask, B, batch_mode):
    """Which (row, slot) of the selected heads run: None when every slot of every row does."""
    if row_mask is not None and batch_mode == "per_row":
        return row_mask
    if count is None:
        return None
    return jnp.broadcast_to((jnp.arange(heads.shape[0]) < count)[None], (B, heads.shape[0]))


def tp_sparse_step(weights, tokens, positions, cache, kv_valid, slot, *, config, sparsity, budgets,
                   selection: str, tp: int, vocab_split: bool):
    """One sparse decode step on this device's shards; `sparse.sparse_step`'s contract.
    Returns (logits [B, V/tp] or [B, V], cache, stats): stats hold the global densities used
    ({"mlp_density", "head_density"}: [L], replicated) and this device's selected counts
    ({"mlp_selected", "head_selected"}: [1, L])."""
    params, pred = weights
    L = config.num_hidden_layers
    F, H = config.ffn_dim, config.num_attention_heads
    view = LocalView(config, tp)
    block = sparsity.block or pred.block_size
    mk_local, hk_local = local_budgets(budgets, config, tp, block)
    eps, impl, mode, pre = config.layer_norm_eps, sparsity.impl, sparsity.batch_mode, config.do_layer_norm_before
    x = embed_local(params, tokens, positions, vocab_split=vocab_split)[:, 0]
    B = x.shape[0]
    new_cache, mlp_n, head_n = [], [], []
    head_scores = predict_head_scores(pred, 0, x) if pred.lookahead else None
    mlp_scores = predict_mlp_scores(pred, 0, x) if pred.lookahead else None
    for layer, (lp, layer_cache) in enumerate(zip(params["layers"], cache)):
        dense = layer in sparsity.dense_layers
        if pred.lookahead and layer + 1 < L:
            next_head, next_mlp = predict_head_scores(pred, layer + 1, x), predict_mlp_scores(pred, layer + 1, x)
        if not pred.lookahead:
            head_scores = predict_head_scores(pred, layer, x)
        h = M.layer_norm(lp["attn_ln"], x, eps) if pre else x
        if dense:
            out, layer_cache = tp_dense_attention_step(lp["attn"], h, layer_cache, kv_valid, slot, view)
            head_n.append(jnp.int32(view.num_attention_heads))
        else:
            heads, hcount, hrows = _choose(head_scores, budgets[1][layer], hk_local[layer], 1, None, selection)
            if B > 1 and mode == "union" and hcount is None:
                hcount = jnp.int32(heads.shape[0])
            hmask = _head_mask(heads, hcount, hrows, B, mode)
            attn_p = {**lp["attn"], "bo": None}
            part, layer_cache, _ = sparse_attention(attn_p, h, layer_cache, kv_valid, slot, heads, hmask,
                                                    config=view, kv_policy=sparsity.kv_policy, impl=impl)
            out = reduce_out(part, lp["attn"]["bo"], x.dtype)
            head_n.append(hcount if hcount is not None else jnp.int32(heads.shape[0]))
        x = x + out
        if not pre:
            x = M.layer_norm(lp["attn_ln"], x, eps)
        h = M.layer_norm(lp["mlp_ln"], x, eps) if pre else x
        if not pred.lookahead:
            mlp_scores = predict_mlp_scores(pred, layer, x)
        if dense:
            y = tp_mlp(lp["mlp"], h[:, None])[:, 0]
            mlp_n.append(jnp.int32(view.ffn_dim))
        else:
            idx, count, rmask = _choose(mlp_scores, budgets[0][layer], mk_local[layer], block,
                                        sparsity.mlp_threshold, selection)
            mp = lp["mlp"]
            if B > 1 and mode == "per_row":
                part = sparse_mlp_masked(h, mp["fc1"], mp["b1"], mp["fc2_t"], None, idx, rmask, count=count,
                                         impl=impl, checked=False)
            else:
                part = sparse_mlp(h, mp["fc1"], mp["b1"], mp["fc2_t"], None, idx, count=count, impl=impl,
                                  checked=False)
            y = reduce_out(part, mp["b2"], x.dtype)
            mlp_n.append(count if count is not None else jnp.int32(idx.shape[0]))
        x = x + y
        if not pre:
            x = M.layer_norm(lp["mlp_ln"], x, eps)
        new_cache.append(layer_cache)
        if pred.lookahead and layer + 1 < L:
            head_scores, mlp_scores = next_head, next_mlp
    mlp_n = jnp.stack(mlp_n).astype(jnp.int32)
    head_n = jnp.stack(head_n).astype(jnp.int32)
    stats = {"mlp_density": psum(mlp_n).astype(F32) / F, "head_density": psum(head_n).astype(F32) / H,
             "mlp_selected": mlp_n[None], "head_selected": head_n[None]}
    return M.lm_head(params, x, config), new_cache, stats
