"""Predictors: the pure predict functions, the Flax module, shapes, checks, random predictors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.errors import ConfigError
from dejavu_jax.predictors import (LowRankScorer, predict_head_indices, predict_head_scores, predict_mlp_indices,
                                   predict_mlp_scores, random_predictors)
from dejavu_jax.predictors.modules import standardize

from conftest import TINY


def test_predict_matches_flax_module_and_jits():
    pred = random_predictors(TINY, rank=16, dtype=jnp.float32, mlp_density=0.25, block_size=8)
    x = jax.random.normal(jax.random.key(0), (3, TINY.hidden_size)) * 5 + 2
    for l in range(TINY.num_hidden_layers):
        params = {"params": {"w1": pred.mlp_w1[l], "w2": pred.mlp_w2[l], "b2": pred.mlp_b2[l]}}
        want = LowRankScorer(16, TINY.ffn_dim).apply(params, x)
        np.testing.assert_allclose(predict_mlp_scores(pred, l, x), want, rtol=1e-6)
        jitted = jax.jit(predict_mlp_scores)(pred, l, x)  # Predictors is a pytree; layer may be traced
        np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)
    assert predict_head_scores(pred, 1, x).shape == (3, TINY.num_attention_heads)
    idx = predict_mlp_indices(pred, 0, x)
    assert idx.shape == (3, pred.mlp_k[0]) and idx.dtype == jnp.int32
    assert predict_head_indices(pred, 0, x, k=1).shape == (3, 1)


def test_standardize_is_scale_invariant():
    x = jax.random.normal(jax.random.key(1), (4, 32))
    np.testing.assert_allclose(standardize(x), standardize(7 * x + 3), rtol=1e-4, atol=1e-4)


def test_random_predictors_shapes_and_k():
    pred = random_predictors(TINY, rank=8, mlp_density=0.1, head_keep=0.5, block_size=16)
    L, d, F, H = TINY.num_hidden_layers, TINY.hidden_size, TINY.ffn_dim, TINY.num_attention_heads
    assert pred.mlp_w1.shape == (L, d, 8) and pred.mlp_w2.shape == (L, 8, F) and pred.mlp_w1.dtype == jnp.bfloat16
    assert pred.head_w2.shape == (L, 8, H)
    assert pred.mlp_k == (16,) * L and pred.head_k == (2,) * L  # 12.8 rounded up to a block; half of 4 heads
    pred.check(TINY)
    with pytest.raises(ConfigError, match="layers, hidden, ffn, heads"):
        pred.check(TINY.replace(num_hidden_layers=3))
    with pytest.raises(ConfigError, match="mlp_k must lie"):
        pred.replace(mlp_k=(0, 16))
    with pytest.raises(ConfigError, match="density"):
        random_predictors(TINY, rank=8, mlp_density=0.0)
