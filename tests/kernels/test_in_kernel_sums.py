"""Sums added in-kernel into a caller's f32 buffer (`acc=`), and the boundary kernel that reads
and zeroes that buffer (`add_layer_norm(recycle=True)`): interpret mode on the CPU against
the references, the sm_90 lowering of the atomic kernels, and the errors.

The Mosaic MLP's atomics (`red.global.add.f32`) run only on a GPU: JAX's GPU interpreter has
no atomics, so in interpret mode `_mosaic_mlp._accumulate` runs the same kernel body writing
partials (tested here) and the lowering test checks that the compiled kernel adds in place.
The Triton out-projection's atomics run in interpret mode too (one program at a time)."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import _mosaic_mlp as mm
from pallas_kernels import _triton_gemv as tg
from pallas_kernels import layer_norm as ln
from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_mlp as sm

from kernel_testutil import assert_close, mlp_inputs, pretend_hopper

SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _acc(rng, b, d):
  return jnp.asarray(rng.standard_normal((b, d)) * 4, jnp.float32)


@SLOW
@given(seed=st.integers(0, 2**16), data=st.data())
def test_mlp_adds_into_acc(seed, data):
  """sparse_mlp(acc=) = acc + the f32 sum (+ b2) on every backend, with short counts, every
  row-group size and CTA count of the Mosaic kernel, bf16 or f32 weights; acc [1, d] or G
  copies [G, 1, d] (the result's copies sum to acc's + the sum)."""
  rng = np.random.default_rng(seed)
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  k = data.draw(st.integers(1, 40))
  count = data.draw(st.integers(0, k))
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 1024, 64, k, dtype, biases=data.draw(st.booleans()))
  copies = data.draw(st.sampled_from([0, 1, 3]))
  acc = _acc(rng, 1, 1024) if not copies else jnp.asarray(rng.standard_normal((copies, 1, 1024)), jnp.float32)
  total = lambda a: a if a.ndim == 2 else a.sum(0)  # noqa: E731
  want = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count, acc=acc)
  assert want.dtype == jnp.float32 and want.shape == acc.shape
  np.testing.assert_allclose(np.asarray(total(want) - total(acc)), np.asarray(sm.sparse_mlp_reference(
      x, w1, b1, w2t, b2, idx, count=count, out_dtype=jnp.float32)), rtol=1e-5, atol=1e-5)
  tuning = mm.MosaicMLPTuning(rows_per_group=data.draw(st.sampled_from([1, 2, 4])), ctas=data.draw(st.integers(1, 5)))
  for impl, t in (("mosaic", tuning), ("triton", None), ("xla", None)):
    got = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=jnp.int32(count), impl=impl, tuning=t, acc=acc)
    assert got.dtype == jnp.float32 and got.shape == acc.shape
    assert_close(total(got) - total(acc), total(want) - total(acc), jnp.float32 if dtype == jnp.float32
                 else jnp.bfloat16, f"{impl} k={k} n={count} copies={copies}")


@SLOW
@given(seed=st.integers(0, 2**16), data=st.data())
def test_out_projection_adds_into_acc(seed, data):
  """head_sparse_out(acc=) = acc + the f32 sum (+ bo): atomically on Triton where every tile is
  in bounds (batch 1 or a full padded batch, block_d dividing d), else acc + the partials' sum;
  from o or from the attention's split outputs."""
  rng = np.random.default_rng(seed)
  b = data.draw(st.sampled_from([1, 1, 2]))
  n_heads, hd = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([8, 16]))
  d = data.draw(st.sampled_from([32, 64, 96]))
  heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
  wo_t = jnp.asarray(rng.standard_normal((n_heads, hd, d)) / np.sqrt(d), jnp.float32)
  bo = jnp.asarray(rng.standard_normal(d), jnp.float32) if data.draw(st.booleans()) else None
  o = jnp.asarray(rng.standard_normal((b, heads.shape[0], hd)), jnp.float32)
  acc = _acc(rng, b, d)
  tuning = sa.HeadProjTuning(block_k=data.draw(st.sampled_from([4, 8])), block_d=data.draw(st.sampled_from([16, 32])),
                             splits=data.draw(st.sampled_from([0, 1, 3])))
  want = sa.head_sparse_out_reference(o, wo_t, bo, heads, acc=acc)
  for impl in ("triton", "xla", "reference"):
    got = sa.head_sparse_out(o, wo_t, bo, heads, impl=impl, tuning=tuning, acc=acc)
    assert got.dtype == jnp.float32 and got.shape == (b, d)
    assert_close(got - acc, want - acc, jnp.float32, f"{impl} b={b} d={d} {tuning}")
  # the attention's split outputs, combined in the kernel's tiles, then added atomically
  kc, vc = (jnp.asarray(rng.standard_normal((b, n_heads, 12, hd)), jnp.float32) for _ in range(2))
  q = jnp.asarray(rng.standard_normal((b, heads.shape[0], hd)) / np.sqrt(hd), jnp.float32)
  mask = jnp.ones((b, 12), bool)
  parts = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, impl="triton", combine=False,
                                          tuning=sa.DecodeAttentionTuning(block_s=4, seq_splits=3))
  got = sa.head_sparse_out(parts, wo_t, bo, heads, impl="triton", tuning=tuning, acc=acc)
  assert_close(got - acc, sa.head_sparse_out(parts.combine(), wo_t, bo, heads, impl="xla", out_dtype=jnp.float32),
               jnp.float32, "from attention partials")


def test_atomic_out_projection_is_used_where_tiles_fit():
  """The atomic kernel runs where every tile is in bounds; its launch holds no partials."""
  assert tg.atomic_fits(1, 5120, 512) and tg.atomic_fits(16, 64, 32)
  assert not tg.atomic_fits(2, 64, 32) and not tg.atomic_fits(1, 96, 64)
  wo_t, o = jnp.zeros((4, 8, 64)), jnp.zeros((1, 2, 8))
  heads, acc = jnp.asarray([0, 3], jnp.int32), jnp.zeros((1, 64))
  t = sa.HeadProjTuning(block_k=4, block_d=32, splits=2)
  def names(b):
    fn = lambda o, a: sa.head_sparse_out(o, wo_t, None, heads, impl="triton", tuning=t, acc=a)  # noqa: E731
    return re.findall(r"name=(dejavu_\w+)", str(jax.make_jaxpr(fn)(o[:1].repeat(b, 0), acc[:1].repeat(b, 0))))
  assert names(1) == ["dejavu_gather_matvec_t_acc"]
  assert names(2) == ["dejavu_gather_matvec_t"]  # a padded batch: the partials, summed by XLA


@SLOW
@given(b=st.integers(1, 3), d=st.integers(1, 700), seed=st.integers(0, 2**16), bias=st.booleans())
def test_boundary_kernel_zeroes_the_buffer_it_reads(b, d, seed, bias):
  """add_layer_norm(recycle=True): the reference's (x_new, h) and zeros in delta's place, with
  delta [B, d] or S f32 copies [S, B, d] of one sum (added in order)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, d)), jnp.bfloat16)
  delta = jnp.asarray(rng.standard_normal((b, d) if seed % 2 else (1 + seed % 5, b, d)), jnp.float32)
  scale, shift = (jnp.asarray(rng.standard_normal(d), jnp.bfloat16) for _ in range(2))
  bias = jnp.asarray(rng.standard_normal(d), jnp.bfloat16) if bias else None
  x_new, h, zeros = ln.add_layer_norm(x, delta, scale, shift, bias=bias, impl="triton", recycle=True)
  want_x, want_h, want_z = ln.add_layer_norm_reference(x, delta, scale, shift, 1e-5, bias, recycle=True)
  np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(want_x, np.float32))
  assert_close(h, want_h, jnp.bfloat16, "h")
  assert zeros.dtype == jnp.float32 and zeros.shape == delta.shape and not np.any(np.asarray(zeros))
  np.testing.assert_array_equal(np.asarray(want_z), np.zeros(delta.shape, np.float32))
  if delta.ndim == 3:  # the copies' sum is the delta
    one = ln.add_layer_norm_reference(x, functools.reduce(jnp.add, list(delta)), scale, shift, 1e-5, bias)
    np.testing.assert_array_equal(np.asarray(want_x, np.float32), np.asarray(one[0], np.float32))


def test_atomic_kernels_lower_for_hopper(monkeypatch):
  """At the OPT-13B and OPT-30B shapes: the Mosaic MLP adds with `red.global.add.f32` into its
  aliased buffer; the Triton out-projection and the recycling boundary kernel alias theirs."""
  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  for d, f, r in ((5120, 20480, 2), (7168, 28672, 1)):
    fn = functools.partial(mm._accumulate, tuning=mm.MosaicMLPTuning(rows_per_group=r), interpret=False)
    text = jax.jit(fn).trace(S((1, d), bf), S((f, d), bf), S((f,), bf), S((f, d), bf), S((f,), jnp.int32),
                             S((1,), jnp.int32), S((8, 1, d), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "red.global.relaxed.gpu.add.f32" in text
    assert re.search(r"output_operand_alias<output_tuple_indices = \[\], operand_index = 6", text)
  pretend_hopper(monkeypatch)
  t = sa._proj_tuning(None, 1, 20 * 128, 5120, op="out")
  out = functools.partial(tg.gather_matvec_t, k=20 * 128, tuning=dataclasses.replace(t, splits=27),
                          rowmap=("heads", 128), h_dtype=jnp.dtype(bf), interpret=False)
  text = jax.jit(out).trace(S((11, 1, 20 * 128), jnp.float32), S((40 * 128, 5120), bf), S((20,), jnp.int32),
                            S((1,), jnp.int32), None, None, (S((11, 1, 20), jnp.float32),) * 2, None,
                            S((1, 5120), jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
  assert "dejavu_gather_matvec_t_acc" in text and "output_operand_alias" in text
  norm = functools.partial(ln._add_layer_norm_triton, eps=1e-5, interpret=False, recycle=True)
  text = jax.jit(norm).trace(S((1, 5120), bf), S((8, 1, 5120), jnp.float32), S((5120,), bf), S((5120,), bf),
                             S((5120,), bf)).lower(lowering_platforms=("cuda",)).as_text()
  assert "dejavu_add_layer_norm" in text and "output_operand_alias" in text


def test_bad_acc():
  rng = np.random.default_rng(0)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 64, 16, 4, jnp.float32)
  with pytest.raises(ValueError, match="acc must have shape"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx, acc=jnp.zeros((1, 32)))
  with pytest.raises(TypeError, match="acc"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx, acc=jnp.zeros((1, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match="out_dtype"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx, acc=jnp.zeros((1, 64)), out_dtype=jnp.bfloat16)
  o, wo_t, heads = jnp.zeros((1, 2, 8)), jnp.zeros((4, 8, 64)), jnp.asarray([0, 1], jnp.int32)
  with pytest.raises(ValueError, match="acc must have shape"):
    sa.head_sparse_out(o, wo_t, None, heads, acc=jnp.zeros((2, 64)))
  with pytest.raises(ValueError, match="out_dtype"):
    sa.head_sparse_out(o, wo_t, None, heads, acc=jnp.zeros((1, 64)), out_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="recycle"):
    ln.add_layer_norm(jnp.zeros((1, 8)), jnp.zeros((1, 8), jnp.bfloat16), jnp.ones(8), jnp.zeros(8), recycle=True)
