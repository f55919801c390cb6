"""`sparse.top_k` (comparison counting for narrow rows) against `jax.lax.top_k`."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dejavu_jax import sparse as S


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(1, S.SMALL_TOP_K), data=st.data(),
       levels=st.sampled_from([3, 1000]), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_small_top_k_equals_lax(batch, n, data, levels, dtype):
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    # few levels: many ties, where lax.top_k puts the lower index first
    scores = jnp.asarray(np.random.default_rng(seed).integers(-levels, levels, (batch, n)) / levels, dtype)
    vals, idx = S.top_k(scores, k)
    want_vals, want_idx = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    np.testing.assert_array_equal(np.asarray(vals, np.float32), np.asarray(want_vals, np.float32))
    assert vals.dtype == scores.dtype and idx.dtype == jnp.int32


def test_wide_rows_use_lax_top_k():
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(1, S.SMALL_TOP_K + 1)), jnp.float32)
    assert "top_k" in jax.jit(lambda x: S.top_k(x, 5)).lower(scores).as_text()
    assert "top_k" not in jax.jit(lambda x: S.top_k(x, 5)).lower(scores[:, :S.SMALL_TOP_K]).as_text()
