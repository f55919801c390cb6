"""matvec_t (Pallas Triton, interpret mode on the CPU) against its reference, and the decode
path that scores predictors with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import _triton_gemv as tg
from pallas_kernels import matvec as mv

SLOW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@SLOW
@given(b=st.sampled_from([1, 1, 3]), n=st.integers(1, 700), m=st.integers(1, 1100), blocks=st.integers(0, 2),
       data=st.data(), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_triton_equals_reference(b, n, m, blocks, data, dtype):
    """Random shapes (not multiples of the tiles), a row offset into a taller weight, auto and
    explicit tunings; relative error within the dtype's rounding."""
    offset = data.draw(st.integers(0, 300))
    key = jax.random.key(data.draw(st.integers(0, 2**31 - 1)))
    x = jax.random.normal(key, (b, n), jnp.float32)
    w = jax.random.normal(jax.random.fold_in(key, 1), (offset + n + blocks * 7, m), dtype)
    tuning = data.draw(st.sampled_from([None, tg.GemvTuning(4, 128, 3, 4), tg.GemvTuning(16, 256, 1, 4)]))
    got = mv.matvec_t(x, w, row_offset=offset, impl="triton", tuning=tuning)
    want = mv.matvec_t_reference(x, w, row_offset=offset)
    assert got.shape == (b, m) and got.dtype == jnp.float32
    scale = float(jnp.abs(want).max()) + 1.0
    assert float(jnp.abs(got - want).max()) / scale < TOL[dtype]


def test_auto_tuning_fills_the_gpu():
    t = mv.auto_tuning(1, 256, 20480, sms=132)  # an OPT-13B MLP predictor's second GEMV
    assert (t.block_k, t.block_d) == (8, 512) and 40 * t.splits >= 264
    t = mv.auto_tuning(1, 5120, 256, sms=132)  # its first GEMV: one column tile, split rows
    assert t.block_d == 256 and t.splits == 264


def test_bad_input():
    x, w = jnp.zeros((1, 8)), jnp.zeros((8, 4))
    with pytest.raises(ValueError, match="must lie in w's 8 rows"):
        mv.matvec_t(x, w, row_offset=1)
    with pytest.raises(ValueError, match="impl"):
        mv.matvec_t(x, w, impl="mosaic")
    with pytest.raises(ValueError, match="batch 65"):
        mv.matvec_t(jnp.zeros((65, 8)), w)
    with pytest.raises(TypeError, match="dtype"):
        mv.matvec_t(x, jnp.zeros((8, 4), jnp.int32))
    assert "dejavu" not in jax.jit(lambda x, w: mv.matvec_t(x, w)).lower(x, w).as_text()  # auto on CPU: XLA


def test_decode_scores_match_the_predictors():
    """`dejavu_jax.sparse.decode_scores` through the kernel (impl="triton") gives the predictors'
    own scores for every layer (the kernel reads each layer's rows of the stacked weights)."""
    from dejavu_jax import sparse as S
    from dejavu_jax.config import preset
    from dejavu_jax.predictors.modules import predict_head_scores, predict_mlp_scores, random_predictors

    cfg = preset("opt-125m").replace(hidden_size=256, ffn_dim=1024, num_attention_heads=4, num_hidden_layers=3)
    pred = random_predictors(cfg, 64, dtype=jnp.float32, seed=3)
    x = jax.random.normal(jax.random.key(5), (1, 256))
    for layer in range(3):
        for kind, ref in (("mlp", predict_mlp_scores), ("head", predict_head_scores)):
            got = S.decode_scores(pred, layer, x, kind, impl="triton")
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref(pred, layer, x)), rtol=1e-4, atol=1e-4)
            auto = S.decode_scores(pred, layer, x, kind)  # CPU: the predictors' einsums
            np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref(pred, layer, x)))
