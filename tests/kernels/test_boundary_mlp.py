"""pallas_kernels.boundary_mlp: the boundary before the MLP computed in the Mosaic MLP's kernel
(interpret mode on the CPU) against its reference and against the two kernels apart."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_testutil import assert_close, mlp_inputs
from pallas_kernels import _mosaic_mlp as mm
from pallas_kernels import boundary_mlp as bm
from pallas_kernels.layer_norm import add_layer_norm
from pallas_kernels.sparse_mlp import sparse_mlp


def boundary_inputs(rng, d, dtype):
  delta = jnp.asarray(rng.normal(size=(1, d)), jnp.float32)
  bias = jnp.asarray(0.5 * rng.normal(size=(d,)), dtype)
  scale = jnp.asarray(1 + 0.1 * rng.normal(size=(d,)), dtype)
  shift = jnp.asarray(0.1 * rng.normal(size=(d,)), dtype)
  return delta, bias, scale, shift


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_boundary_in_the_mlp_kernel(seed, data):
  """Any live count (0 to k), rows per group, CTAs, software pipeline or PDL order, with and
  without the biases: x_new is the reference's bit for bit, y within f32 rounding of it and
  bit for bit the boundary kernel + the Mosaic MLP apart (same tuning)."""
  rng = np.random.default_rng(seed)
  k = data.draw(st.integers(4, 40))
  count = data.draw(st.integers(0, k))
  pipeline = data.draw(st.booleans())
  tuning = mm.MosaicMLPTuning(rows_per_group=data.draw(st.sampled_from([1, 2, 4])),
                              ctas=data.draw(st.integers(1, 6)), pipeline=pipeline,
                              pdl=not pipeline and data.draw(st.booleans()))
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 512, 64, k, jnp.float32, biases=data.draw(st.booleans()))
  delta, bias, scale, shift = boundary_inputs(rng, 512, jnp.float32)
  bias = bias if data.draw(st.booleans()) else None
  got_x, got_y = bm.boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx, count=jnp.int32(count),
                                        bias=bias, impl="mosaic", tuning=tuning)
  want_x, want_y = bm.boundary_sparse_mlp_reference(x, delta, scale, shift, w1, b1, w2t, b2, idx, count=count,
                                                    bias=bias)
  np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want_x))
  assert_close(got_y, want_y, jnp.float32, f"count={count}/{k} {tuning}")
  apart_x, h = add_layer_norm(x, delta, scale, shift, 1e-5, bias=bias, impl="triton")
  apart_y = sparse_mlp(h, w1, b1, w2t, b2, idx, count=jnp.int32(count), impl="mosaic", tuning=tuning)
  np.testing.assert_array_equal(np.asarray(got_x), np.asarray(apart_x))
  np.testing.assert_array_equal(np.asarray(got_y), np.asarray(apart_y))


def test_bf16_and_the_f32_sum():
  """bf16 weights and stream (16-byte rows of 8): the unrounded f32 sum without b2 (what the
  decode step hands the next boundary) and the rounded output with b2."""
  rng = np.random.default_rng(3)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 1024, 48, 17, jnp.bfloat16)
  delta, bias, scale, shift = boundary_inputs(rng, 1024, jnp.bfloat16)
  for b2_, out_dtype in ((None, jnp.float32), (b2, None)):
    got = bm.boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2_, idx, count=jnp.int32(9), bias=bias,
                                 impl="mosaic", out_dtype=out_dtype)
    want = bm.boundary_sparse_mlp_reference(x, delta, scale, shift, w1, b1, w2t, b2_, idx, count=9, bias=bias,
                                            out_dtype=out_dtype)
    assert got[1].dtype == want[1].dtype == (out_dtype or jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    assert_close(got[1], want[1], jnp.bfloat16, f"b2={b2_ is not None}")


def test_other_impls_are_the_two_calls():
  """"triton", "xla", "reference", batch 2 or a width the Mosaic kernel does not take: the
  boundary and the MLP as two calls, each on its own path; same results as the reference."""
  rng = np.random.default_rng(4)
  for b, d, impl in ((1, 512, "triton"), (1, 512, "xla"), (1, 512, "reference"), (2, 512, "mosaic"),
                     (1, 96, "mosaic")):
    x, w1, b1, w2t, b2, idx = mlp_inputs(rng, b, d, 32, 8, jnp.float32)
    delta, bias, scale, shift = boundary_inputs(rng, d, jnp.float32)
    delta = jnp.tile(delta, (b, 1))
    assert not bm.fused(x, delta, w1, impl)
    got = bm.boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx, bias=bias, impl=impl)
    want = bm.boundary_sparse_mlp_reference(x, delta, scale, shift, w1, b1, w2t, b2, idx, bias=bias)
    for g, r in zip(got, want):
      assert_close(g, r, jnp.float32, f"{impl} b={b} d={d}")


def test_bad_arguments_are_rejected():
  rng = np.random.default_rng(5)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 512, 32, 8, jnp.float32)
  delta, bias, scale, shift = boundary_inputs(rng, 512, jnp.float32)
  call = functools.partial(bm.boundary_sparse_mlp, w1=w1, b1=b1, w2t=w2t, b2=b2, idx=idx, impl="mosaic")
  with pytest.raises(ValueError, match="delta"):
    call(x, delta[:, :256], scale, shift)
  with pytest.raises(ValueError, match="one sum"):
    call(x, delta[None], scale, shift)
  with pytest.raises(ValueError, match="scale"):
    call(x, delta, scale[:100], shift)
  with pytest.raises(ValueError, match="eps"):
    call(x, delta, scale, shift, eps=0.0)
  with pytest.raises(ValueError):
    bm.boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx.at[0].set(99), impl="mosaic")
  with pytest.raises(ValueError, match="tma"):
    bm.boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx, impl="mosaic",
                           tuning=mm.MosaicMLPTuning(tma=True))


def test_lowers_at_opt_shapes():
  """The fused kernel lowers for the GPU on the CPU at the OPT-13B and OPT-30B shapes (the
  final compile needs the GPU: scripts/check_step_fusions.py runs it there), named for profiles."""
  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  for d, f in ((5120, 20480), (7168, 28672)):
    fn = functools.partial(mm.boundary_partials, eps=1e-5, interpret=False)
    text = jax.jit(fn).trace(S((1, d), bf), S((1, d), jnp.float32), S((d,), bf), S((d,), bf), S((d,), bf),
                             S((f, d), bf), S((f,), bf), S((f, d), bf), S((f,), jnp.int32),
                             S((1,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "dejavu_boundary_mlp" in text
