"""Tensor-parallel decoding: `dense_decode` / `sparse_decode` over a ``tp`` device mesh.

    mesh = make_mesh(tp=2)
    model = dj.load_opt(path, mesh=mesh)                 # each leaf straight onto its shards
    out = tp_dense_decode(model, prompt, 32, mesh=mesh)
    out = tp_sparse_decode(model, predictors, prompt, 32, mesh=mesh,
                           sparsity=dj.SparsityConfig(mlp_density=0.1, head_keep=0.5))

Same arguments and outputs as the single-device functions, plus ``mesh``. The decode loop
(`dejavu_jax.decode.generate_tokens`: prefill, `lax.while_loop`, sampling) runs in jit's
global view; each step is one `jax.shard_map` of the per-device layer code
(`dejavu_jax.parallel.layers` / `tp_sparse`). The KV cache is created sharded by heads and
stays so; the logits come back split over the vocabulary and sampling reads them as one
global array (XLA adds the small gather the argmax needs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dejavu_jax import model as M
from dejavu_jax.decode import check_sampling, generate_tokens, prepare_prompt
from dejavu_jax.errors import ConfigError
from dejavu_jax.parallel import layers as TL
from dejavu_jax.parallel import tp_sparse as TS
from dejavu_jax.parallel.mesh import AXIS, tp_size, vocab_sharded
from dejavu_jax.parallel.shardings import (cache_specs, param_specs, predictor_specs, shard_model,
                                           shard_predictors)
from dejavu_jax.predictors.modules import Predictors
from dejavu_jax.sparse import SparsityConfig, check_predictors, init_sparse_cache

STATICS = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "mesh")


def _logit_spec(config, tp):
    return P(None, AXIS) if vocab_sharded(config, tp) else P()


def sharded_cache(cache, mesh):
    """The cache constrained to its head sharding (inside jit), and its PartitionSpecs."""
    specs = cache_specs(cache)
    return jax.tree.map(lambda c, s: jax.lax.with_sharding_constraint(c, NamedSharding(mesh, s)), cache, specs), specs


def make_dense_step(cfg, mesh, cspecs):
    """The dense step over the mesh (a `decode.StepFn`; prefill and decode alike). ``cspecs``:
    the cache's PartitionSpecs (`shardings.cache_specs`)."""
    tp = tp_size(mesh)
    split = vocab_sharded(cfg, tp)
    local = functools.partial(TL.tp_forward_cached, config=cfg, vocab_split=split)
    smap = jax.shard_map(lambda w, t, p, c, kv, i: local(w, t, p, c, kv, i), mesh=mesh,
                         in_specs=(param_specs(cfg, tp), P(), P(), cspecs, P(), P()),
                         out_specs=(_logit_spec(cfg, tp), cspecs))

    def step(weights, tokens, positions, cache, kv_valid, write_index):
        logits, cache = smap(weights, tokens, positions, cache, kv_valid, jnp.asarray(write_index, jnp.int32))
        return logits, cache, None
    return step


@functools.partial(jax.jit, static_argnames=STATICS)
def _tp_dense_jit(model, prompt, mask, key, *, mesh, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    cfg = model.config
    cache = M.init_cache(cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, model.dtype)
    cache, cspecs = sharded_cache(cache, mesh)
    step = make_dense_step(cfg, mesh, cspecs)
    out, _ = generate_tokens(step, step, model.params, prompt, mask, key, cache, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                             pad_token_id=cfg.pad_token_id)
    return out


def _prepare_model(model: M.OPTModel, mesh) -> M.OPTModel:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ConfigError(f"mesh must be a jax.sharding.Mesh with a 'tp' axis (make_mesh(tp=...)); got "
                          f"{type(mesh).__name__}.")
    return shard_model(model, mesh)


def tp_dense_decode(model: M.OPTModel, prompt_tokens, max_new_tokens: int = 32, *, mesh,
                    attention_mask=None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, eos_token_id: int | None = None) -> jax.Array:
    """`dejavu_jax.dense_decode` with every layer split over ``mesh``'s ``"tp"`` axis.
    Params not yet on their shardings are moved there (pass a model loaded with ``mesh=``
    to avoid the copy). Returns int32 [B, T + max_new_tokens], replicated."""
    model = _prepare_model(model, mesh)
    cfg = model.config
    check_sampling(cfg, temperature, top_k, top_p)
    tokens, mask, extra = prepare_prompt(cfg, prompt_tokens, attention_mask, max_new_tokens)
    new = _tp_dense_jit(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed), mesh=mesh,
                        max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=top_k,
                        top_p=top_p, eos_token_id=eos_token_id)
    return jnp.concatenate([jnp.asarray(tokens[:, extra:]), new], axis=1)


# ---- sparse ---------------------------------------------------------------------------------------
def _xla_kernels_only(impl: str) -> bool:
    """True when every sparse op runs the XLA path here. Only then can shard_map check that
    replicated outputs really are (check_vma): `pallas_call` outputs carry no varying-axes type
    yet, so with Pallas kernels the check is off (the collectives are the same either way)."""
    if impl in ("xla", "reference"):
        return True
    if impl != "auto":
        return False
    from pallas_kernels.dispatch import OPS, backend_for
    return all(backend_for(op, batch=b) == "xla" for op in OPS for b in (1, 2))


def make_sparse_steps(cfg, mesh, cspecs, pred: Predictors, *, sparsity, budgets, selection):
    """(dense prefill, sparse step): `decode.StepFn`s over the mesh; weights = (params, predictors)."""
    tp = tp_size(mesh)
    split = vocab_sharded(cfg, tp)
    wspecs = (param_specs(cfg, tp), predictor_specs(pred))
    local_step = functools.partial(TS.tp_sparse_step, config=cfg, sparsity=sparsity, budgets=budgets,
                                   selection=selection, tp=tp, vocab_split=split)
    stat_specs = {"mlp_density": P(), "head_density": P(), "mlp_selected": P(AXIS), "head_selected": P(AXIS)}
    step_map = jax.shard_map(local_step, mesh=mesh, in_specs=(wspecs, P(), P(), cspecs, P(), P()),
                             out_specs=(_logit_spec(cfg, tp), cspecs, stat_specs),
                             check_vma=_xla_kernels_only(sparsity.impl))
    dense_local = functools.partial(TL.tp_forward_cached, config=cfg, vocab_split=split)

    def prefill_local(weights, tokens, positions, cache, kv_valid, write_index):
        logits, new = dense_local(weights[0], tokens, positions, cache, kv_valid, write_index)
        if "head_valid" in cache[0]:
            T = tokens.shape[1]
            new = [{**c, "head_valid": c["head_valid"].at[:, :, :T].set(True)} for c in new]
        return logits, new

    prefill_map = jax.shard_map(prefill_local, mesh=mesh, in_specs=(wspecs, P(), P(), cspecs, P(), P()),
                                out_specs=(_logit_spec(cfg, tp), cspecs))

    def step(weights, tokens, positions, cache, kv_valid, slot):
        return step_map(weights, tokens, positions, cache, kv_valid, jnp.asarray(slot, jnp.int32))

    def prefill(weights, tokens, positions, cache, kv_valid, write_index):
        return (*prefill_map(weights, tokens, positions, cache, kv_valid, jnp.asarray(write_index, jnp.int32)),
                None)
    return prefill, step


@functools.partial(jax.jit, static_argnames=STATICS + ("sparsity", "budgets", "selection"))
def _tp_sparse_jit(model, predictors, prompt, mask, key, *, mesh, max_new_tokens, temperature, top_k, top_p,
                   eos_token_id, sparsity, budgets, selection):
    cfg = model.config
    B, T = prompt.shape
    cache = init_sparse_cache(cfg, B, T + max_new_tokens, model.dtype, sparsity.kv_policy)
    cache, cspecs = sharded_cache(cache, mesh)
    prefill, step = make_sparse_steps(cfg, mesh, cspecs, predictors, sparsity=sparsity, budgets=budgets,
                                selection=selection)
    return generate_tokens(step, prefill, (model.params, predictors), prompt, mask, key, cache,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=eos_token_id, pad_token_id=cfg.pad_token_id)


def tp_sparse_decode(model: M.OPTModel, predictors: Predictors, prompt_tokens, max_new_tokens: int = 32, *,
                     mesh, sparsity: SparsityConfig | None = None, selection: str = "per_device",
                     attention_mask=None, temperature: float = 0.0, top_k: int | None = None,
                     top_p: float | None = None, seed: int = 0, eos_token_id: int | None = None,
                     return_stats: bool = False):
    """`dejavu_jax.sparse_decode` over ``mesh``'s ``"tp"`` axis.

    selection: "per_device" (balanced: each device keeps ceil(k / tp) of its own neurons and
    heads) or "global" (the global top-k, each device running its members; the set
    single-device sparse_decode runs). See `dejavu_jax.parallel.tp_sparse`.
    Returns int32 [B, T + max_new_tokens]; with ``return_stats`` also per-step statistics:
    {"mlp_density", "head_density"}: [steps, L] (global fractions used) and
    {"mlp_selected", "head_selected"}: [steps, tp, L] (rows each device ran)."""
    if selection not in TS.SELECTIONS:
        raise ConfigError(f"selection must be one of {TS.SELECTIONS}, got {selection!r}.")
    sparsity = sparsity or SparsityConfig(lookahead=predictors.lookahead)
    check_predictors(model, predictors, sparsity)
    budgets = sparsity.layer_budgets(model.config, predictors)
    model = _prepare_model(model, mesh)
    cfg = model.config
    check_sampling(cfg, temperature, top_k, top_p)
    tokens, mask, extra = prepare_prompt(cfg, prompt_tokens, attention_mask, max_new_tokens)
    predictors = shard_predictors(predictors.astype(model.dtype), mesh)
    new, stats = _tp_sparse_jit(model, predictors, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                                mesh=mesh, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, sparsity=sparsity,
                                budgets=budgets, selection=selection)
    out = jnp.concatenate([jnp.asarray(tokens[:, extra:]), new], axis=1)
    if not return_stats:
        return out
    tp = tp_size(mesh)
    stats = {k: (v.reshape(v.shape[0], tp, -1) if k.endswith("selected") else v) for k, v in stats.items()}
    return out, stats


def shard_for_decode(model: M.OPTModel, mesh, predictors: Predictors | None = None):
    """(model, predictors) placed on ``mesh`` as the tp decoders expect (predictors in the
    model's dtype). Useful before timing, so the first call does not include the copy."""
    model = _prepare_model(model, mesh)
    if predictors is None:
        return model, None
    return model, shard_predictors(predictors.astype(model.dtype), mesh)


__all__ = ["tp_dense_decode", "tp_sparse_decode", "shard_for_decode"]
