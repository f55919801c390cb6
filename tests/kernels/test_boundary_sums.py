"""Partials summed by the boundary kernel (`add_layer_norm(arrivals=)`) and the unsummed outputs
that feed it (`sparse_mlp(unsummed=True)`, `head_sparse_out(unsummed=True)`): interpret mode on
the CPU against the references, the sm_90 lowering, and the errors.

In interpret mode the split kernel's programs run one after another, so the last one to
arrive is the last in the grid; on the GPU any program can be last, which the GPU check
(`scripts/check_step_fusions.py`) covers."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import layer_norm as ln
from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_mlp as sm

from kernel_testutil import assert_close, mlp_inputs, pretend_hopper

SLOW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(b=st.integers(1, 3), d=st.integers(1, 1200), parts=st.integers(1, 70), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([jnp.bfloat16, jnp.float32]), bias=st.booleans(),
       block_d=st.sampled_from([16, 64]), row_block=st.sampled_from([4, 32]))
def test_split_kernel_sums_the_partials(b, d, parts, seed, dtype, bias, block_d, row_block):
    """(x_new, h) of the partials' sum, the counts zeroed again, for any number of partials,
    widths that are not powers of 2 and the tile sizes; a second call on the returned counts
    is as right as the first."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, d)) * 3 + 10, dtype)
    part = jnp.asarray(rng.standard_normal((parts, b, d)), jnp.float32)
    scale, shift = (jnp.asarray(rng.standard_normal(d), dtype) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal(d), dtype) if bias else None
    arrivals = jnp.zeros((b,), jnp.int32)
    split = functools.partial(ln._add_layer_norm_split, eps=1e-5, interpret=True, block_d=block_d,
                              row_block=row_block)
    want_x, want_h, want_z = ln.add_layer_norm_reference(x, part, scale, shift, 1e-5, bias, arrivals=arrivals)
    for _ in range(2):
        x_new, h, arrivals = split(x, part, scale, shift, arrivals, bias)
        assert x_new.dtype == h.dtype == dtype and arrivals.dtype == jnp.int32
        # the partials are summed in another order than the reference's: x_new within one rounding
        assert_close(x_new, want_x, dtype, f"x_new b={b} d={d} parts={parts}")
        assert_close(h, want_h, dtype, f"h b={b} d={d} parts={parts}")
        np.testing.assert_array_equal(np.asarray(arrivals), np.zeros(b, np.int32))
    np.testing.assert_array_equal(np.asarray(want_z), np.zeros(b, np.int32))


def test_split_kernel_matches_the_one_program_kernel_on_one_partial():
    """One partial: nothing to reorder, so the split kernel's x_new is the one-program kernel's
    bit for bit (the same rounding), through the public entry point."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 700)), jnp.bfloat16)
    delta = jnp.asarray(rng.standard_normal((2, 700)), jnp.float32)
    scale, shift, bias = (jnp.asarray(rng.standard_normal(700), jnp.bfloat16) for _ in range(3))
    one = ln.add_layer_norm(x, delta, scale, shift, bias=bias, impl="triton")
    split = ln.add_layer_norm(x, delta[None], scale, shift, bias=bias, impl="triton", arrivals=jnp.zeros(2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(split[0], np.float32), np.asarray(one[0], np.float32))
    assert_close(split[1], one[1], jnp.bfloat16, "h")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), data=st.data())
def test_unsummed_partials_sum_to_the_result(seed, data):
    """sparse_mlp / head_sparse_out(unsummed=True): f32 [S, B, d] partials (one on the XLA and
    reference paths) whose sum is the f32 result, on every backend."""
    rng = np.random.default_rng(seed)
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    k = data.draw(st.integers(1, 40))
    count = data.draw(st.integers(0, k))
    b = data.draw(st.sampled_from([1, 1, 2]))
    x, w1, b1, w2t, _, idx = mlp_inputs(rng, b, 512, 64, k, dtype, biases=data.draw(st.booleans()))
    want = sm.sparse_mlp_reference(x, w1, b1, w2t, None, idx, count=count, out_dtype=jnp.float32)
    for impl in ("mosaic", "triton", "xla", "reference"):
        part = sm.sparse_mlp(x, w1, b1, w2t, None, idx, count=jnp.int32(count), impl=impl, unsummed=True)
        assert part.dtype == jnp.float32 and part.ndim == 3 and part.shape[1:] == (b, 512)
        assert_close(part.sum(0), want, jnp.float32 if dtype == jnp.float32 else jnp.bfloat16, f"{impl} k={k}")
    n_heads, hd, d = data.draw(st.integers(1, 6)), 8, data.draw(st.sampled_from([32, 96]))
    heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
    wo_t = jnp.asarray(rng.standard_normal((n_heads, hd, d)) / np.sqrt(d), jnp.float32)
    o = jnp.asarray(rng.standard_normal((b, heads.shape[0], hd)), jnp.float32)
    want = sa.head_sparse_out_reference(o, wo_t, None, heads, out_dtype=jnp.float32)
    tuning = sa.HeadProjTuning(block_k=4, block_d=16, splits=data.draw(st.sampled_from([0, 1, 3])))
    for impl in ("triton", "xla", "reference"):
        part = sa.head_sparse_out(o, wo_t, None, heads, impl=impl, tuning=tuning, unsummed=True)
        assert part.dtype == jnp.float32 and part.ndim == 3 and part.shape[1:] == (b, d)
        assert_close(part.sum(0), want, jnp.float32, f"out {impl} {tuning}")


def test_split_kernel_lowers_for_hopper(monkeypatch):
    """At the OPT-13B and OPT-30B shapes (264 / 27 partials): one Triton kernel whose counts
    are aliased in place."""
    pretend_hopper(monkeypatch)
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    for d, parts in ((5120, 264), (5120, 27), (7168, 264)):
        fn = functools.partial(ln._add_layer_norm_split, eps=1e-5, interpret=False)
        text = jax.jit(fn).trace(S((1, d), bf), S((parts, 1, d), jnp.float32), S((d,), bf), S((d,), bf),
                                 S((1,), jnp.int32), S((d,), bf)).lower(lowering_platforms=("cuda",)).as_text()
        assert "dejavu_add_layer_norm_split" in text
        assert re.search(r"output_operand_alias<output_tuple_indices = \[2\], operand_index = 5", text)


def test_bad_arrivals_and_unsummed():
    x, part = jnp.zeros((1, 8)), jnp.zeros((3, 1, 8))
    with pytest.raises(ValueError, match="arrivals must have shape"):
        ln.add_layer_norm(x, part, jnp.ones(8), jnp.zeros(8), arrivals=jnp.zeros(2, jnp.int32))
    with pytest.raises(TypeError, match="arrivals"):
        ln.add_layer_norm(x, part, jnp.ones(8), jnp.zeros(8), arrivals=jnp.zeros(1))
    with pytest.raises(ValueError, match="partials"):
        ln.add_layer_norm(x, x, jnp.ones(8), jnp.zeros(8), arrivals=jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="pass one"):
        ln.add_layer_norm(x, part, jnp.ones(8), jnp.zeros(8), recycle=True, arrivals=jnp.zeros(1, jnp.int32))
    rng = np.random.default_rng(0)
    xm, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 64, 16, 4, jnp.float32)
    with pytest.raises(ValueError, match="unsummed"):
        sm.sparse_mlp(xm, w1, b1, w2t, b2, idx, unsummed=True)
    with pytest.raises(ValueError, match="unsummed"):
        sm.sparse_mlp(xm, w1, b1, w2t, None, idx, unsummed=True, out_dtype=jnp.bfloat16)
    assert sm.sparse_mlp(xm, w1, b1, w2t, None, idx, unsummed=True, out_dtype="float32", impl="xla").shape == (1, 1, 64)
    o, wo_t, heads = jnp.zeros((1, 2, 8)), jnp.zeros((4, 8, 64)), jnp.asarray([0, 1], jnp.int32)
    with pytest.raises(ValueError, match="unsummed"):
        sa.head_sparse_out(o, wo_t, jnp.zeros(64), heads, unsummed=True)
    with pytest.raises(ValueError, match="unsummed"):
        sa.head_sparse_out(o, wo_t, None, heads, unsummed=True, acc=jnp.zeros((1, 64)))
