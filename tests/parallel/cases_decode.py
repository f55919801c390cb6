"""Tensor-parallel dense and sparse (full density) decode on 1, 2, 4 and 8 simulated devices give
the single-device tokens (f32, tiny random OPT with heads and ffn_dim divisible by 8)."""

from __future__ import annotations

from cases_common import CFG, NEW, TPS  # 8 devices, set before JAX starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import dejavu_jax as dj  # noqa: E402
from dejavu_jax import model as M  # noqa: E402
from dejavu_jax import parallel as par  # noqa: E402
from dejavu_jax.errors import ConfigError  # noqa: E402
from dejavu_jax.sparse import SparsityConfig  # noqa: E402


@pytest.fixture(scope="module")
def dense_ref(model, prompt):
    tokens, mask = prompt
    return np.asarray(dj.dense_decode(model, tokens, NEW, attention_mask=mask))


@pytest.mark.parametrize("tp", TPS)
def test_dense_matches_single_device(model, prompt, dense_ref, tp):
    tokens, mask = prompt
    out = par.tp_dense_decode(model, tokens, NEW, mesh=par.make_mesh(tp), attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), dense_ref)


@pytest.mark.parametrize("tp", TPS)
def test_sparse_full_density_equals_dense(model, pred, prompt, dense_ref, tp):
    """Density 1.0 and every head: each device runs the sparse kernels on all of its shard."""
    tokens, mask = prompt
    sp = SparsityConfig(mlp_density=1.0, head_keep=1.0)
    out, stats = par.tp_sparse_decode(model, pred, tokens, NEW, mesh=par.make_mesh(tp), sparsity=sp,
                                      attention_mask=mask, return_stats=True)
    np.testing.assert_array_equal(np.asarray(out), dense_ref)
    np.testing.assert_array_equal(np.asarray(stats["mlp_density"]), 1.0)
    assert stats["mlp_selected"].shape == (NEW - 1, tp, CFG.num_hidden_layers)


def test_vocab_not_divisible_is_replicated(prompt):
    cfg = CFG.replace(vocab_size=100)
    m = M.random_model(cfg, jnp.float32, std=0.3, seed=2)
    tokens = np.minimum(prompt[0][:1], 99)
    ref = np.asarray(dj.dense_decode(m, tokens, 4))
    with pytest.warns(UserWarning, match="not divisible"):
        sharded = par.shard_model(m, par.make_mesh(8))
    assert sharded.params["embed_tokens"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(par.tp_dense_decode(sharded, tokens, 4, mesh=par.make_mesh(8))), ref)


def test_params_and_cache_are_sharded(model):
    mesh = par.make_mesh(4)
    m = par.shard_model(model, mesh)
    lp = m.params["layers"][0]
    assert lp["attn"]["wqkv"].addressable_shards[0].data.shape == (3, 2, 8, 64)
    assert lp["mlp"]["fc1"].addressable_shards[0].data.shape == (64, 64)
    assert m.params["embed_tokens"].addressable_shards[0].data.shape == (32, 64)
    assert lp["attn_ln"]["scale"].sharding.is_fully_replicated
    per_dev = par.shardings.bytes_per_device(m.params, par.param_shardings(CFG, mesh))
    total = m.num_bytes()
    assert len(set(per_dev)) == 1 and per_dev[0] < 0.35 * total


def test_errors(model, pred):
    with pytest.raises(ConfigError, match="divisible"):
        par.param_specs(CFG.replace(num_attention_heads=4), 8)
    with pytest.raises(ConfigError, match="tp=9"):
        par.make_mesh(9)
    with pytest.raises(ConfigError, match="selection"):
        par.tp_sparse_decode(model, pred, [[2, 5]], 2, mesh=par.make_mesh(2), selection="random")
