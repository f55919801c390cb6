"""One token's attention in a sparse decode step (`dejavu_jax.sparse.sparse_step`): the
head-sparse path over `pallas_kernels.sparse_attention`'s ops, and the dense path of a layer
kept dense."""

from __future__ import annotations

import jax.numpy as jnp

from dejavu_jax import model as M
from pallas_kernels.sparse_attention import (head_sparse_decode_attention, head_sparse_out,
                                             head_sparse_q_kv_update, q_kv_update_ops)

F32 = jnp.float32

COMBINE_IN_OUT_PROJECTION = False  # see sparse_attention


def sparse_attention(p, h, cache, kv_valid, slot, heads, head_mask, *, config, kv_policy, impl,
                     fused: bool = False, side=None, scatter=None, scores_of=None, scores_in_attention=False,
                     acc=None, unsummed=False):
    """Head-sparse attention for one token. h: [B, d] (after attn_ln); heads: [k_h] int32;
    head_mask: [B, k_h] (1 = this row uses the head) or None; cache: {"k", "v"[, "head_valid"]}.
    ``fused``: q, its scaling and the K/V of every head (kv_policy "all") or of the selected
    heads ("selected") into the cache in one kernel (`head_sparse_q_kv_update`; unfused: the
    same as separate ops); and the output is the out-projection's f32 sum without its bias
    (`add_layer_norm` adds it); with `COMBINE_IN_OUT_PROJECTION` (off: measured slower) and no
    head mask, the out-projection also combines the attention's split outputs. With "selected"
    the attention reads each head's own valid slots (`head_valid`). ``side``: a
    `pallas_kernels.hosted_sets.SideGemv` and ``scatter``: a `TileSets` (this layer's MLP set
    before its scatter), computed by the same q + K/V call (fused: in its launch); with
    ``scores_of`` (hidden -> a `pallas_kernels.hosted_sets.ScoresJob`, with ``side``), the
    next layer's scores in the out-projection's call (in the attention's with
    ``scores_in_attention``). ``acc`` (fused, f32 [B, d]): the output is
    acc + the out-projection's sum, added in its kernel (`head_sparse_out(acc=)`). ``unsummed``
    (fused): the out-projection's f32 partials [S, B, d], for the boundary kernel to sum. Returns
    ([B, d], cache, {"hidden": the
    side GEMV's f32 [1, n], "sets": (idx, count), "scores": (heads, TileSets)} for those given)."""
    B = h.shape[0]
    # q + the K/V heads' K/V into the cache: one kernel when fused, else the separate ops; with
    # "selected" and no per-row head mask, the same call marks the selected heads' slots valid
    update = head_sparse_q_kv_update if fused else q_kv_update_ops
    selected = kv_policy == "selected"
    mark = selected and head_mask is None
    q, k_cache, v_cache, *more = update(h, p["wqkv"], p["bqkv"], heads, cache["k"], cache["v"], slot,
                                        q_scale=config.head_dim**-0.5, kv_heads=kv_policy,
                                        head_valid=cache["head_valid"] if mark else None, side=side,
                                        scatter=scatter, impl=impl, checked=False)
    head_valid = more.pop(0) if mark else None
    extra = {"hidden": more.pop(0)} if side is not None else {}
    if scatter is not None:
        extra["sets"] = tuple(more)
    if selected and not mark:  # the slot now holds K/V for the heads this row computed
        head_valid = cache["head_valid"].at[jnp.arange(B)[:, None], heads[None], slot].max(head_mask.astype(bool))
    # The attention's split outputs are combined by XLA (one small kernel): the out-projection
    # can combine them per tile (`combine=False`), but measured slower on an H100 (13B 4.79 vs
    # 4.71 ms/token, 30B 10.70 vs 10.31; run of 2c84010, pallas_kernels/NOTES.md)
    job = None if scores_of is None else scores_of(extra["hidden"])
    attn_job, out_job = (job, None) if scores_in_attention else (None, job)  # the launch that hosts it
    o = head_sparse_decode_attention(q, k_cache, v_cache, heads, kv_valid, head_valid=head_valid, impl=impl,
                                     checked=False, combine=not (COMBINE_IN_OUT_PROJECTION and fused
                                                                 and head_mask is None),
                                     scores=attn_job)
    if attn_job is not None:
        o, extra["scores"] = o
    cache = {"k": k_cache, "v": v_cache} if head_valid is None else {"k": k_cache, "v": v_cache,
                                                                      "head_valid": head_valid}
    if head_mask is not None:
        o = o * head_mask[..., None].astype(o.dtype)
    bo, out_dtype = (None, F32) if fused else (p["bo"], None)
    out = head_sparse_out(o, p["wo_t"], bo, heads, impl=impl, checked=False, out_dtype=out_dtype, scores=out_job,
                          acc=acc, unsummed=unsummed)
    if out_job is not None:
        out, extra["scores"] = out
    return out, cache, extra



def _dense_attention(p, h, cache, kv_valid, slot, config):
    """Dense attention of one token against a (possibly head_valid-carrying) cache."""
    allowed = kv_valid[:, None, :] & (jnp.arange(kv_valid.shape[1]) <= slot)[None, None]
    kv = {"k": cache["k"], "v": cache["v"]}
    out, kv = M.attention(p, h[:, None], kv, allowed, slot, config=config)
    if "head_valid" in cache:
        kv["head_valid"] = cache["head_valid"].at[:, :, slot].set(True)
    return out[:, 0], kv
