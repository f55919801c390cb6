"""Balance measures and the offline neuron / head permutation (one device)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.parallel import balance as B
from dejavu_jax.predictors.modules import random_predictors
from dejavu_jax.sparse import SparsityConfig, sparse_decode

CFG = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=32)


def test_imbalance_and_summary():
    counts = np.array([[4, 4], [6, 2], [0, 0]])
    np.testing.assert_allclose(B.imbalance(counts), [1.0, 1.5, 1.0])
    s = B.summarize(counts)
    assert s["max"] == 1.5 and s["n"] == 3
    assert np.isclose(s["work_ratio"], (4 + 6) / (4 + 4))


def test_device_counts_and_per_device_member():
    member = np.zeros((1, 8), bool)
    member[0, :4] = True  # all selected units in the first half
    np.testing.assert_array_equal(B.device_counts(member, 2), [[4, 0]])
    perm = B.balanced_permutation(member[0].astype(float), 2)
    assert sorted(perm.tolist()) == list(range(8))
    np.testing.assert_array_equal(B.device_counts(member, 2, perm), [[2, 2]])
    vals = np.arange(8.0)[None]
    np.testing.assert_array_equal(B.per_device_member(vals, 4, 2), [[0, 0, 1, 1, 0, 0, 1, 1]])
    assert B.mass_recall(vals, B.top_k_member(vals, 8)) == 1.0


def test_permuted_model_decodes_the_same():
    """Permuting neurons and heads (with the predictors' outputs) changes no token: the sparse
    decode selects the same units in their new places."""
    model = M.random_model(CFG, jnp.float32, std=0.3, seed=4)
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32, seed=1)
    rng = np.random.default_rng(0)
    nperm = [rng.permutation(CFG.ffn_dim) for _ in range(CFG.num_hidden_layers)]
    hperm = [rng.permutation(CFG.num_attention_heads) for _ in range(CFG.num_hidden_layers)]
    pm, pp = B.permute_units(model, pred, neuron_perms=nperm, head_perms=hperm)
    tokens = rng.integers(3, CFG.vocab_size, (1, 5))
    sp = SparsityConfig(mlp_density=0.5, head_keep=0.5)
    np.testing.assert_array_equal(np.asarray(sparse_decode(pm, pp, tokens, 6, sparsity=sp)),
                                  np.asarray(sparse_decode(model, pred, tokens, 6, sparsity=sp)))
