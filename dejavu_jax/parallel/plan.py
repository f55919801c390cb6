"""Memory plan of a tensor-parallel OPT on N devices, without the devices' memory.

Three kinds of figures, kept apart in the output:

* **exact** (`jax.eval_shape` + `NamedSharding.shard_shape`): per-device bytes of the params,
  the predictors and the KV cache at full size, from the same shardings the decoders use;
* **compiled** (`jit(...).lower(...).compile().memory_analysis()` with N simulated CPU
  devices): argument / temp bytes of one tp decode step and of the prefill, at reduced widths
  (head size 128, fewer heads, F = 4 d) and 2 or 4 layers;
* **extrapolated**: the compiled temp bytes carried to full width and depth by a fit
  (temp = base(d) + layers * per_layer(d), base and per_layer quadratic in d through the
  reduced widths). These are CPU XLA figures, an upper bound for the GPU: they hold the XLA
  path's weight gathers (the all-heads K/V projection copies 2 d^2 / tp weights per layer)
  and the CPU backend's f32 copies of bf16 matmul weights; XLA schedules those copies
  early, off the layer chain, so they add up over the layers (the dense step's 1.69 GiB per
  layer at full width is exactly one f32 copy of a layer's local weights). The GPU's Pallas
  kernels read the weights in place; `pallas_decode_activations` gives that path's own
  (small) decode buffers by formula. The prefill (plain XLA einsums on both) holds
  attention scores B x H/tp x T x S in f32, which do not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.parallel import shardings as SH
from dejavu_jax.parallel import tp_decode as TD
from dejavu_jax.parallel.mesh import tp_size
from dejavu_jax.predictors.modules import random_predictors
from dejavu_jax.sparse import SparsityConfig, init_sparse_cache

GIB = 2**30


def _abstract(shapes, specs, mesh):
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p)),
                        shapes, specs)


def _device_bytes(abstract) -> int:
    """Bytes the busiest device holds of a pytree of sharded ShapeDtypeStructs."""
    leaves = jax.tree.leaves(abstract)
    return max(SH.bytes_per_device(leaves, [x.sharding for x in leaves]))


def predictor_shapes(cfg: OPTConfig, rank: int, head_rank: int, dtype):
    return jax.eval_shape(lambda: random_predictors(cfg, rank, head_rank=head_rank, block_size=128, dtype=dtype))


def abstract_inputs(cfg: OPTConfig, mesh, batch: int, context: int, rank: int, head_rank: int, dtype):
    """(params, predictors, cache) as sharded ShapeDtypeStructs, and the cache's specs."""
    params = _abstract(M.param_shapes(cfg, dtype), SH.param_specs(cfg, tp_size(mesh)), mesh)
    pshape = predictor_shapes(cfg, rank, head_rank, dtype)
    pred = _abstract(pshape, SH.predictor_specs(pshape), mesh)
    cshape = jax.eval_shape(lambda: init_sparse_cache(cfg, batch, context, dtype, "all"))
    cspecs = SH.cache_specs(cshape)
    return params, pred, _abstract(cshape, cspecs, mesh), cspecs


def exact_plan(cfg: OPTConfig, mesh, batches, context: int, rank: int, head_rank: int, dtype) -> dict:
    """Per-device GiB of params, predictors and KV cache (per batch) at full size."""
    out = {}
    for b in batches:
        params, pred, cache, _ = abstract_inputs(cfg, mesh, b, context, rank, head_rank, dtype)
        out.setdefault("params_gib", _device_bytes(params) / GIB)
        out.setdefault("predictors_gib", _device_bytes(pred) / GIB)
        out[f"kv_cache_batch{b}_gib"] = _device_bytes(cache) / GIB
    out["params_total_gib"] = cfg.num_params() * jnp.dtype(dtype).itemsize / GIB
    return out


def compiled_step(cfg: OPTConfig, mesh, batch: int, context: int, path: str, rank: int, head_rank: int, dtype,
                  sparsity: SparsityConfig, prompt: int = 0) -> dict:
    """memory_analysis of one jitted tp step (cache donated): path "sparse" / "dense" (one
    decode token) or "prefill" (``prompt`` tokens into a cache of ``context`` slots)."""
    params, pred, cache, cspecs = abstract_inputs(cfg, mesh, batch, context, rank, head_rank, dtype)
    T = prompt if path == "prefill" else 1
    pshape = predictor_shapes(cfg, rank, head_rank, dtype)
    if path == "dense":
        step, weights = TD.make_dense_step(cfg, mesh, cspecs), params
    else:
        budgets = sparsity.layer_budgets(cfg, pshape)
        prefill, sparse = TD.make_sparse_steps(cfg, mesh, cspecs, pshape, sparsity=sparsity, budgets=budgets,
                                               selection="per_device")
        step, weights = (prefill if path == "prefill" else sparse), (params, pred)
    rep = NamedSharding(mesh, P())
    tok = jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=rep)
    kv = jax.ShapeDtypeStruct((batch, context), bool, sharding=rep)
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    compiled = jax.jit(lambda w, t, p, c, k, s: step(w, t, p, c, k, s)[:2], donate_argnums=3).lower(
        weights, tok, tok, cache, kv, slot).compile()
    ma = compiled.memory_analysis()
    return {"argument_gib": ma.argument_size_in_bytes / GIB, "output_gib": ma.output_size_in_bytes / GIB,
            "alias_gib": ma.alias_size_in_bytes / GIB, "temp_gib": ma.temp_size_in_bytes / GIB,
            # jit drops unused arguments: the prefill does not read the predictors
            "analytic_argument_gib": (_device_bytes(params if path == "prefill" else weights)
                                      + _device_bytes(cache)) / GIB}


def reduced_config(full: OPTConfig, width: int, layers: int) -> OPTConfig:
    return full.replace(hidden_size=width, word_embed_proj_dim=width, ffn_dim=4 * width,
                        num_attention_heads=width // full.head_dim, num_hidden_layers=layers)


def extrapolate(points: dict, width: int, layers: int) -> dict:
    """points: {(d, L): temp}. Fits temp = base(d) + L * per_layer(d) (each quadratic in d) and
    evaluates at (width, layers)."""
    widths = sorted({d for d, _ in points})
    Ls = sorted({L for _, L in points})
    lo, hi = Ls[0], Ls[-1]
    per_layer = [(points[(d, hi)] - points[(d, lo)]) / (hi - lo) for d in widths]
    base = [points[(d, lo)] - lo * pl for d, pl in zip(widths, per_layer)]
    deg = min(2, len(widths) - 1)
    fp, fb = np.polyfit(widths, per_layer, deg), np.polyfit(widths, base, deg)
    pl_full, b_full = float(np.polyval(fp, width)), float(np.polyval(fb, width))
    return {"temp_gib": b_full + layers * pl_full, "per_layer_gib": pl_full, "base_gib": b_full,
            "fit": f"base(d) + L * per_layer(d), polynomials of degree {deg} in d through d = {widths}"}


def pallas_decode_activations(cfg: OPTConfig, tp: int, batch: int, mlp_k_local: int, head_k_local: int,
                              block_k: int = 16, seq_splits: int = 8) -> float:
    """GiB of the GPU (Pallas) decode step's own buffers per device, by formula: the residual
    and its LayerNorms (f32), q/k/v, flash-decoding partials, the fused MLP's per-block
    partial outputs (f32), predictor scores and the logits (local and gathered, f32). Live at
    once within one layer; layers reuse them."""
    d, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    per_layer = (6 * batch * d * 4 + 3 * batch * (cfg.num_attention_heads // tp) * hd * 2
                 + seq_splits * batch * head_k_local * (hd + 2) * 4
                 + -(-mlp_k_local // block_k) * batch * d * 4
                 + batch * (cfg.ffn_dim // tp + cfg.num_attention_heads // tp) * 4 * 2)
    logits = batch * (V // tp + V) * 4
    return (per_layer + logits) / GIB


__all__ = ["exact_plan", "compiled_step", "reduced_config", "extrapolate", "pallas_decode_activations"]
