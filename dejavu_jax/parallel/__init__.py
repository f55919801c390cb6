"""Tensor parallelism over a JAX device mesh (axis ``"tp"``): Megatron-style sharding of OPT,
dense and contextual-sparse decode with the per-device layer code under `jax.shard_map`.

    from dejavu_jax import parallel as par
    mesh = par.make_mesh(tp=2)
    model = dj.load_opt(path, mesh=mesh)
    out = par.tp_dense_decode(model, prompt, 32, mesh=mesh)
    out = par.tp_sparse_decode(model, predictors, prompt, 32, mesh=mesh, sparsity=...)

docs/multi_gpu.md describes the layout, the balance of the selected sets and several hosts.
"""

from dejavu_jax.parallel.mesh import AXIS, make_mesh, tp_size
from dejavu_jax.parallel.shardings import (param_sharding_fn, param_shardings, param_specs,
                                           random_sharded_model, shard_model, shard_predictors)
from dejavu_jax.parallel.tp_decode import shard_for_decode, tp_dense_decode, tp_sparse_decode

__all__ = ["AXIS", "make_mesh", "tp_size", "param_sharding_fn", "param_shardings", "param_specs",
           "random_sharded_model", "shard_model", "shard_predictors", "shard_for_decode",
           "tp_dense_decode", "tp_sparse_decode"]
