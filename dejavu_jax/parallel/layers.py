"""Per-device layer code for tensor parallelism: runs inside `jax.shard_map` over ``"tp"``.

Each device holds H/tp heads, F/tp MLP neurons and (when the vocabulary splits) V/tp rows of
the embedding; the residual stream ``x`` [B, T, d] is replicated. A layer is::

    attention over the device's heads -> partial out-projection -> psum -> + bo
    MLP over the device's neurons     -> partial fc2            -> psum -> + b2

two all-reduces per layer (Megatron-LM). Dense partial sums are reduced in f32 and the bias
added after the reduction, so each output equals the single-device one up to the order of
the f32 sums. The embedding is a masked lookup in the device's rows plus a psum (exact: one
device contributes each row); the LM head gives each device its vocabulary slice of the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dejavu_jax import model as M
from dejavu_jax.config import POSITION_OFFSET, OPTConfig
from dejavu_jax.parallel.mesh import AXIS

F32 = jnp.float32


def psum(x):
    return jax.lax.psum(x, AXIS)


def embed_local(params, tokens, positions, *, vocab_split: bool):
    """tokens, positions: [B, T] -> x [B, T, d] (replicated) from this device's embedding rows."""
    emb = params["embed_tokens"]
    if vocab_split:
        rows = emb.shape[0]
        local = tokens - jax.lax.axis_index(AXIS) * rows
        inside = (local >= 0) & (local < rows)
        x = jnp.take(emb, jnp.clip(local, 0, rows - 1), axis=0)
        x = psum(jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)))
    else:
        x = jnp.take(emb, tokens, axis=0)
    if "project_in" in params:
        x = jnp.einsum("bte,ed->btd", x, params["project_in"], preferred_element_type=F32).astype(x.dtype)
    return x + jnp.take(params["embed_positions"], positions + POSITION_OFFSET, axis=0)


def reduce_out(partial, bias, dtype):
    """Sum the devices' partial outputs, then add the (replicated) bias once."""
    y = psum(partial.astype(F32) if partial.dtype != F32 else partial)
    return (y + bias.astype(F32)).astype(dtype)


def tp_attention(p, x, cache, allowed, write_index, *, config):
    """`dejavu_jax.model.attention` over this device's heads, reduced over the mesh.
    p holds the device's heads: wqkv [3, H/tp, hd, d], wo_t [H/tp, hd, d]."""
    q, k, v = M.qkv_projection(p, x, config.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if cache is not None:
        start = (0, 0, write_index, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        cache = {**cache, "k": k, "v": v}
    o = M.attend(q, k, v, allowed)
    partial = jnp.einsum("bthk,hkd->btd", o, p["wo_t"], preferred_element_type=F32)
    return reduce_out(partial, p["bo"], x.dtype), cache


def tp_mlp(p, x):
    """`dejavu_jax.model.mlp` over this device's neurons, reduced over the mesh."""
    h = jnp.einsum("btd,fd->btf", x, p["fc1"], preferred_element_type=F32) + p["b1"].astype(F32)
    h = jax.nn.relu(h.astype(x.dtype))
    partial = jnp.einsum("btf,fd->btd", h, p["fc2_t"], preferred_element_type=F32)
    return reduce_out(partial, p["b2"], x.dtype)


tp_layer = functools.partial(M.decoder_layer, attention_fn=tp_attention, mlp_fn=tp_mlp)


def tp_forward_cached(params, tokens, positions, cache, kv_valid, write_index, *, config: OPTConfig,
                      vocab_split: bool):
    """`dejavu_jax.model.forward_cached` (last position only) on this device's shards.
    Returns (logits [B, V/tp] (or [B, V] when the vocabulary is replicated), cache)."""
    T = tokens.shape[1]
    S = cache[0]["k"].shape[2]
    allowed = (jnp.arange(S)[None, :] <= write_index + jnp.arange(T)[:, None])[None] & kv_valid[:, None, :]
    x = embed_local(params, tokens, positions, vocab_split=vocab_split)
    new_cache = []
    for lp, layer_cache in zip(params["layers"], cache):
        x, layer_cache = tp_layer(lp, x, layer_cache, allowed, write_index, config=config)
        new_cache.append(layer_cache)
    return M.lm_head(params, x[:, -1], config), new_cache


def tp_dense_attention_step(p, h, cache, kv_valid, slot, config):
    """Dense attention of one token (h: [B, d]) on this device's heads; keeps ``head_valid``."""
    allowed = kv_valid[:, None, :] & (jnp.arange(kv_valid.shape[1]) <= slot)[None, None]
    kv = {"k": cache["k"], "v": cache["v"]}
    out, kv = tp_attention(p, h[:, None], kv, allowed, slot, config=config)
    if "head_valid" in cache:
        kv["head_valid"] = cache["head_valid"].at[:, :, slot].set(True)
    return out[:, 0], kv
