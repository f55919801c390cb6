"""Top-k selection kernel (Pallas Triton, interpret mode on the CPU) against its reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import select as sel

SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _scores(rng, b, n, levels, dtype):
    if levels:  # few distinct values: many ties at the k-th score
        s = rng.integers(-levels, levels + 1, (b, n)) / levels
    else:
        s = rng.normal(size=(b, n)) * rng.choice([1e-3, 1.0, 1e4])
    return jnp.asarray(s, dtype)


@SLOW
@given(b=st.sampled_from([1, 1, 2, 5]), n=st.integers(1, 3000), data=st.data(),
       levels=st.sampled_from([0, 0, 1, 4, 300]), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_triton_equals_reference(b, n, data, levels, dtype):
    k = data.draw(st.sampled_from([1, n, max(1, n // 10), data.draw(st.integers(1, n))]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    s = _scores(rng, b, n, levels, dtype)
    got = np.asarray(sel.top_k_indices(s, k, impl="triton"))
    want = np.asarray(sel.top_k_indices_reference(s, k))
    assert got.shape == (b, k) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_opt13b_row_and_warps():
    """The decode shape (F = 20 480, 10%) with the warp count the GPU uses."""
    s = jax.random.normal(jax.random.key(7), (1, 20480))
    got = sel._top_k_triton(s, k=2048, num_warps=sel._auto_warps(20480), interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sel.top_k_indices_reference(s, 2048)))


@given(n=st.integers(2, 500), data=st.data())
@settings(max_examples=30, deadline=None)
def test_reference_is_lax_top_k_as_a_set(n, data):
    """Distinct scores: the same set as lax.top_k, ascending; the k-th largest is included."""
    k = data.draw(st.integers(1, n))
    s = jnp.asarray(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).permutation(n) - n / 2,
                    jnp.float32)[None]
    got = np.asarray(sel.top_k_indices_reference(s, k))[0]
    want = np.asarray(jax.lax.top_k(s, k)[1])[0]
    assert (np.diff(got) > 0).all() and set(got) == set(want)


def test_order_key_orders_like_floats():
    x = jnp.asarray([-np.inf, -3e38, -2.5, -1e-40, 0.0, 1e-40, 1.0, 3.5, 3e38, np.inf], jnp.float32)
    keys = np.asarray(sel.order_key(x))
    assert (np.diff(keys) > 0).all()


def test_ties_go_to_the_lower_index():
    s = jnp.asarray([[1.0, 2.0, 1.0, 1.0, 2.0, 0.0]])
    for impl in ("triton", "xla"):
        np.testing.assert_array_equal(np.asarray(sel.top_k_indices(s, 3, impl=impl)), [[0, 1, 4]])


def test_bad_input():
    s = jnp.zeros((1, 8))
    with pytest.raises(ValueError, match="k must be an int in \\[1, 8\\]"):
        sel.top_k_indices(s, 9)
    with pytest.raises(ValueError, match="k must be"):
        sel.top_k_indices(s, 0)
    with pytest.raises(ValueError, match="2 dimensions"):
        sel.top_k_indices(jnp.zeros(8), 2)
    with pytest.raises(TypeError, match="dtype"):
        sel.top_k_indices(jnp.zeros((1, 8), jnp.int32), 2)
    with pytest.raises(ValueError, match="impl"):
        sel.top_k_indices(s, 2, impl="mosaic")


def test_auto_is_xla_on_cpu():
    s = jax.random.normal(jax.random.key(0), (1, 300))
    text = jax.jit(lambda x: sel.top_k_indices(x, 30)).lower(s).as_text()
    assert "top_k" in text or "sort" in text
    assert "dejavu_top_k_select" not in text


# ---- threshold_compact: the batch-1 threshold set in one program ----------------------------
@SLOW
@given(n=st.integers(1, 5000), data=st.data(), levels=st.sampled_from([0, 0, 2, 300]),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_threshold_compact_triton_equals_reference(n, data, levels, dtype):
    """Interpret mode against the reference: same indices (ascending, zeros past the count),
    same count, for caps that bind and caps that do not, ties at the threshold included."""
    k = data.draw(st.sampled_from([n, max(1, n // 10), data.draw(st.integers(1, n))]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    s = _scores(rng, 1, n, levels, dtype)[0]
    t = data.draw(st.sampled_from([0.0, 0.5, -1.0, float(np.quantile(np.asarray(s, np.float32), 0.9))]))
    got_idx, got_count = sel.threshold_compact(s, t, k, impl="triton")
    want_idx, want_count = sel.threshold_compact_reference(s, t, k)
    assert got_idx.shape == (k,) and got_idx.dtype == jnp.int32 and got_count.dtype == jnp.int32
    assert int(got_count) == int(want_count) == min(k, int((np.asarray(s) > np.asarray(t, s.dtype)).sum()))
    np.testing.assert_array_equal(np.asarray(got_idx), np.asarray(want_idx))


def test_threshold_compact_opt13b_row():
    """The decode shape (F = 20 480, a cap of F, about 10% above) with the GPU's warp count, and
    a traced threshold under jit (one compile for every threshold)."""
    s = jax.random.normal(jax.random.key(3), (20480,))
    f = jax.jit(lambda s, t: sel._compact_triton(s, t, k=20480, num_warps=sel._compact_warps(20480),
                                                 interpret=True))
    for t in (1.2816, 3.0, 10.0):
        got, count = f(s, jnp.float32(t))
        want, want_count = sel.threshold_compact_reference(s, t, 20480)
        assert int(count) == int(want_count)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_threshold_compact_bad_input_and_auto():
    s = jnp.zeros((8,))
    with pytest.raises(ValueError, match="k must be an int in \\[1, 8\\]"):
        sel.threshold_compact(s, 0.0, 9)
    with pytest.raises(ValueError, match="1 dimensions"):
        sel.threshold_compact(jnp.zeros((1, 8)), 0.0, 2)
    with pytest.raises(ValueError, match="impl"):
        sel.threshold_compact(s, 0.0, 2, impl="mosaic")
    text = jax.jit(lambda x: sel.threshold_compact(x, 0.0, 4)).lower(s).as_text()
    assert "dejavu_threshold_compact" not in text  # auto on the CPU: the XLA reference
