"""Choosing a sparse layer's sets from its predictors' scores (used by `dejavu_jax.sparse`, which
re-exports these names): the scores (`decode_scores`, through `pallas_kernels.matvec` where it
measured faster), exact top-k (`top_k`) and the per-row / union sets of a batch (`select`).
The decode step calls `select` through `dejavu_jax.sparse`'s namespace, so an ablation that
replaces `sparse.select` (`bench_sparse.patched_select`) reaches every call."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dejavu_jax.predictors.modules import Predictors, low_rank_scores, standardize
from pallas_kernels.matvec import matvec_t
from pallas_kernels.select import threshold_compact, top_k_indices

F32 = jnp.float32


MATVEC_MIN_RANK = 512  # MLP predictors of at least this rank score through `matvec_t`


def decode_scores(pred: Predictors, layer: int, x: jax.Array, kind: str, impl: str = "auto") -> jax.Array:
    """Layer ``layer``'s ``kind`` ("mlp" or "head") predictor scores of x [B, d] -> f32 [B, n]:
    `predict_mlp_scores` / `predict_head_scores`. An MLP predictor of rank >= `MATVEC_MIN_RANK`
    runs its two low-rank GEMVs through `pallas_kernels.matvec.matvec_t` where
    `pallas_kernels.dispatch` picks that kernel (Hopper, batch 1), reading the layer's rows of
    the stacked [L, d, r] / [L, r, n] weights in place (a row offset). Measured on an H100
    (layer_kernels.json, us a layer, XLA einsums vs the kernel): OPT-30B's rank-512 MLP
    predictor 64.1 vs 26.4 (XLA's column reduction over 512 rows of [512, 28 672] ran at 0.2
    of peak); rank 256 at OPT-13B 14.9 vs 15.9 and the head predictors 10.1 vs 11.4 (13B),
    13.1 vs 14.2 (30B) stay XLA."""
    from pallas_kernels import dispatch

    w1, w2, b2 = ((pred.mlp_w1, pred.mlp_w2, pred.mlp_b2) if kind == "mlp"
                  else (pred.head_w1, pred.head_w2, pred.head_b2))
    if impl == "auto":  # the kernel where it measured faster
        kernel = (kind == "mlp" and w1.shape[2] >= MATVEC_MIN_RANK
                  and dispatch.backend_for("matvec_t", batch=x.shape[0]) == "triton")
    else:  # impl="triton" / "mosaic": the kernel; "xla" / "reference": the einsums
        kernel = impl not in ("xla", "reference")
    if not kernel:
        return low_rank_scores(w1[layer], w2[layer], b2[layer], x)
    return matvec_scores(w1, w2, b2, layer, x)


def matvec_scores(w1, w2, b2, layer: int, x: jax.Array, tunings=(None, None)) -> jax.Array:
    """`low_rank_scores` of layer ``layer`` of stacked predictor weights (w1 [L, d, r], w2
    [L, r, n], b2 [L, n]) through `matvec_t` (Triton), each GEMV reading the layer's rows in
    place; ``tunings``: the two GEMVs' `GemvTuning` (None: `matvec.auto_tuning`)."""
    L, d, r = w1.shape
    h = matvec_t(standardize(x), w1.reshape(L * d, r), row_offset=layer * d, impl="triton", tuning=tunings[0])
    s = matvec_t(h, w2.reshape(L * r, w2.shape[2]), row_offset=layer * r, impl="triton", tuning=tunings[1])
    return s + b2[layer].astype(F32)


SMALL_TOP_K = 256  # rows up to this width rank by comparison counting instead of a sort


def top_k(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, same values, indices and order (ties: lower index
    first). Rows of up to `SMALL_TOP_K` entries (the heads: 12 to 96) rank by counting, for
    each entry, the entries that beat it: two small fused reductions instead of a sort
    kernel, which costs about as much for 40 entries as for 20 480."""
    n = scores.shape[-1]
    if n > SMALL_TOP_K:
        return jax.lax.top_k(scores, k)
    s = scores.astype(F32)
    i = jnp.arange(n)
    ahead = (s[..., None, :] > s[..., :, None]) | ((s[..., None, :] == s[..., :, None]) & (i[None, :] < i[:, None]))
    rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # [..., n]: 0 = the largest
    pick = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, n]
    idx = jnp.sum(jnp.where(pick, i, 0), axis=-1, dtype=jnp.int32)
    return jnp.take_along_axis(scores, idx, axis=-1), idx


def select(scores: jax.Array, k: int, block: int, threshold: float | None = None, impl: str = "auto"):
    """Per-row top-k of ``scores`` [B, n] -> (idx [k_cap] int32, count int32 scalar or None,
    row_mask [B, k_cap] bool or None). B == 1: idx is the row's top-k (no mask, and a count
    only with a threshold). B > 1: idx lists the union of the rows' sets (padded to the
    static cap min(B k, n) rounded to ``block``), count = its size, row_mask marks each
    row's own members.

    B == 1 with a threshold: the entries above it, ascending, by compaction (no sort;
    `pallas_kernels.select.threshold_compact`); if more than k pass, the k lowest-indexed.
    Otherwise sets come from `top_k` (best first, so a threshold's survivors come first), or,
    for rows wider than `SMALL_TOP_K` without a threshold, from the selection kernel
    `pallas_kernels.select.top_k_indices` (indices ascending) where `pallas_kernels.dispatch`
    picks it. ``impl`` is `SparsityConfig.impl`."""
    B, n = scores.shape
    if B == 1 and threshold is not None:
        # A threshold needs no ranking: compact the entries above it (ascending, no sort), in
        # one kernel where `pallas_kernels.dispatch` picks `threshold_compact` (Hopper), else
        # XLA's nonzero. If more than k pass, the k lowest-indexed are kept; the kernels read
        # `count` rows whatever k is, so a generous cap (mlp_density) costs index space only.
        compact_impl = "xla" if impl in ("xla", "reference") else "auto" if impl == "auto" else "triton"
        idx, count = threshold_compact(scores[0], threshold, k, impl=compact_impl)
        return idx, count, None
    if threshold is not None and k >= n:
        # no cap: each row's set is its scores above the threshold, no ranking needed
        member = scores > threshold
        top_idx = keep = None
    elif threshold is None and n > SMALL_TOP_K and _select_kernel(impl, B):
        top_idx, keep = top_k_indices(scores, k, impl="triton"), None
    else:
        top_vals, top_idx = top_k(scores, k)
        keep = top_vals > threshold if threshold is not None else None
    if B == 1:  # no threshold here (compacted above): the row's top k, no count
        return top_idx[0].astype(jnp.int32), None, None
    if top_idx is not None:
        member = jnp.zeros((B, n), bool).at[jnp.arange(B)[:, None], top_idx].set(
            True if keep is None else keep)
    union = member.any(0)
    cap = min(n, max(k, math.ceil(min(B * k, n) / block) * block))
    idx = jnp.nonzero(union, size=cap, fill_value=0)[0].astype(jnp.int32)
    count = jnp.sum(union).astype(jnp.int32)
    row_mask = member[:, idx] & (jnp.arange(cap) < count)[None]
    return idx, count, row_mask


def _select_kernel(impl: str, batch: int) -> bool:
    """Whether the MLP's sets come from the Pallas selection kernel: where the dispatch table
    picks it for `top_k_select` (it does not on Hopper: measured slower than the sort)."""
    from pallas_kernels import dispatch

    return impl not in ("xla", "reference") and dispatch.backend_for("top_k_select", batch=batch) == "triton"
