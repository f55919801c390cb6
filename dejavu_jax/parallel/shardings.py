"""Where every array lives on a ``tp`` mesh (Megatron-style tensor parallelism).

=================  ==================  ===========================================
leaf               global shape        PartitionSpec (split over "tp")
=================  ==================  ===========================================
embed_tokens       [V, E]              ("tp", None): rows of the vocabulary
                                       (replicated when V % tp != 0, with a warning)
attn.wqkv          [3, H, hd, d]       (None, "tp", None, None): heads
attn.bqkv          [3, H, hd]          (None, "tp", None)
attn.wo_t          [H, hd, d]          ("tp", None, None)
mlp.fc1, fc2_t     [F, d]              ("tp", None): neurons
mlp.b1             [F]                 ("tp",)
everything else    (LayerNorms, bo,    replicated (): small
                   b2, positions,
                   project_in/out)
KV cache k, v      [B, H, S, hd]       (None, "tp", None, None): heads
head_valid         [B, H, S]           (None, "tp", None)
predictors w2, b2  [L, r, n], [L, n]   n (neurons / heads) split; w1 replicated
=================  ==================  ===========================================

Device i holds heads [i H/tp, (i+1) H/tp), neurons [i F/tp, (i+1) F/tp) and vocabulary rows
[i V/tp, (i+1) V/tp): contiguous blocks, so the split costs no data movement at load time.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.parallel.mesh import AXIS, check_divisible, tp_size, vocab_sharded
from dejavu_jax.predictors.modules import Predictors

_LAYER_SPECS = {
    ("attn", "wqkv"): P(None, AXIS, None, None),
    ("attn", "bqkv"): P(None, AXIS, None),
    ("attn", "wo_t"): P(AXIS, None, None),
    ("mlp", "fc1"): P(AXIS, None),
    ("mlp", "b1"): P(AXIS),
    ("mlp", "fc2_t"): P(AXIS, None),
}
CACHE_SPECS = {"k": P(None, AXIS, None, None), "v": P(None, AXIS, None, None),
               "head_valid": P(None, AXIS, None)}
_warned: set = set()


def spec_for(path: tuple, config: OPTConfig, tp: int) -> P:
    """The PartitionSpec of the params leaf at ``path`` (e.g. ("layers", 3, "mlp", "fc1"))."""
    if path[0] == "layers":
        return _LAYER_SPECS.get(tuple(path[2:]), P())
    if path == ("embed_tokens",):
        if vocab_sharded(config, tp):
            return P(AXIS, None)
        if (config.vocab_size, tp) not in _warned:
            _warned.add((config.vocab_size, tp))
            warnings.warn(f"vocab_size {config.vocab_size} is not divisible by tp={tp}: the embedding "
                          "and LM head are replicated on every device (pad the vocabulary to a "
                          "multiple of tp to split them).", stacklevel=3)
        return P()
    return P()


def param_specs(config: OPTConfig, tp: int) -> Any:
    """The params pytree (`dejavu_jax.model` layout) with a PartitionSpec at every leaf."""
    check_divisible(config, tp)
    shapes = M.param_shapes(config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    return jax.tree_util.tree_unflatten(treedef, [spec_for(_path(k), config, tp) for k, _ in flat])


def _path(keys) -> tuple:
    return tuple(k.key if hasattr(k, "key") else k.idx for k in keys)


def param_sharding_fn(config: OPTConfig, mesh: jax.sharding.Mesh):
    """``leaf_path -> NamedSharding``: the ``sharding=`` callable of `dejavu_jax.load_opt`."""
    tp = tp_size(mesh)
    check_divisible(config, tp)
    return lambda path: NamedSharding(mesh, spec_for(tuple(path), config, tp))


def param_shardings(config: OPTConfig, mesh: jax.sharding.Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(config, tp_size(mesh)))


def shard_model(model: M.OPTModel, mesh: jax.sharding.Mesh) -> M.OPTModel:
    """``model`` with every leaf on its tp sharding (leaf by leaf; a leaf already there stays)."""
    shardings = param_shardings(model.config, mesh)
    params = jax.tree.map(_put, model.params, shardings)
    return dataclasses.replace(model, params=params)


def _put(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if not sharding.is_fully_addressable and isinstance(x, jax.Array):
        # several processes: every process holds the same full value; each keeps its shards
        x = np.asarray(x)
    return jax.device_put(x, sharding)


# ---- predictors and cache ----------------------------------------------------------------------
def predictor_specs(pred: Predictors) -> Predictors:
    """A Predictors whose array fields are PartitionSpecs (a shard_map ``in_specs`` prefix)."""
    return dataclasses.replace(pred, mlp_w1=P(), mlp_w2=P(None, None, AXIS), mlp_b2=P(None, AXIS),
                               head_w1=P(), head_w2=P(None, None, AXIS), head_b2=P(None, AXIS))


def shard_predictors(pred: Predictors, mesh: jax.sharding.Mesh) -> Predictors:
    specs = predictor_specs(pred)
    return dataclasses.replace(pred, **{n: _put(a, NamedSharding(mesh, getattr(specs, n)))
                                        for n, a in pred.arrays().items()})


def cache_specs(cache: list[dict]) -> list[dict]:
    return [{name: CACHE_SPECS[name] for name in c} for c in cache]


# ---- random weights made in place -----------------------------------------------------------------
def random_sharded_model(config: OPTConfig, mesh: jax.sharding.Mesh, dtype=jnp.bfloat16, seed: int = 0,
                         std: float = 0.02) -> M.OPTModel:
    """`dejavu_jax.model.random_model`'s weights (the same values: same keys, and JAX's
    threefry gives the same numbers whatever the sharding), each leaf drawn directly on its
    tp sharding, so no device ever holds more than its share (OPT-66B on 2 GPUs)."""
    shapes = M.param_shapes(config, dtype)
    shardings = param_shardings(config, mesh)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(paths))
    fns: dict = {}
    leaves = []
    for key, (path, s), sh in zip(keys, paths, jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path)
        kind = "ones" if name.endswith("['scale']") else (
            "zeros" if s.ndim == 1 or name.endswith("['bqkv']") else "normal")
        sig = (kind, s.shape, sh)
        if sig not in fns:
            fns[sig] = jax.jit(_maker(kind, s.shape, dtype, std), out_shardings=sh)
        leaves.append(fns[sig](key))
    return M.OPTModel(config, jax.tree_util.tree_unflatten(treedef, leaves))


def _maker(kind, shape, dtype, std):
    if kind == "ones":
        return lambda key: jnp.ones(shape, dtype)
    if kind == "zeros":
        return lambda key: jnp.zeros(shape, dtype)
    return lambda key: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ---- bookkeeping ----------------------------------------------------------------------------------
def bytes_per_device(tree, shardings) -> list[int]:
    """Bytes each device of the shardings' mesh holds for ``tree`` (arrays or ShapeDtypeStructs)
    placed on ``shardings`` (a matching pytree of NamedShardings)."""
    totals: dict = {}
    for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        itemsize = jnp.dtype(x.dtype).itemsize
        shard = sh.shard_shape(x.shape)
        n = itemsize
        for dim in shard:
            n *= dim
        for dev in sh.mesh.devices.flat:
            totals[dev.id] = totals.get(dev.id, 0) + n
    return [totals[d.id] for d in next(iter(jax.tree.leaves(shardings))).mesh.devices.flat]
