"""One process of the several-process test (test_multihost.py): 2 simulated CPU devices per
process, `jax.distributed` over localhost with gloo collectives, the same mesh code as on
one host. argv: process_id num_processes port checkpoint_dir out_json."""

from __future__ import annotations

import json
import os
import sys

pid, nproc, port, ckpt, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import dejavu_jax as dj  # noqa: E402
from dejavu_jax import parallel as par  # noqa: E402
from dejavu_jax.predictors.modules import random_predictors  # noqa: E402


def gather(x):
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


mesh = par.make_mesh()  # every process's devices
model = dj.load_opt(ckpt, jnp.float32, mesh=mesh, progress=False)
fc1 = model.params["layers"][0]["mlp"]["fc1"]
tokens = np.array([[2, 17, 40, 99, 5]])
pred = random_predictors(model.config, 8, block_size=8, dtype=jnp.float32)
sp = dj.SparsityConfig(mlp_density=0.5, head_keep=0.5)
res = {"process_count": jax.process_count(), "device_count": jax.device_count(),
       "local_fc1_shards": [list(s.data.shape) for s in fc1.addressable_shards],
       "dense": gather(par.tp_dense_decode(model, tokens, 6, mesh=mesh)).tolist(),
       "sparse_global": gather(par.tp_sparse_decode(model, pred, tokens, 6, mesh=mesh, sparsity=sp,
                                                    selection="global")).tolist()}
with open(out_file, "w") as f:
    json.dump(res, f)
jax.distributed.shutdown()
