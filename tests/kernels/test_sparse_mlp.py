"""Sparse MLP kernels (Pallas, interpret mode on the CPU) against the jnp reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import dispatch
from pallas_kernels import sparse_mlp as sm
from pallas_kernels import _mosaic_mlp as mm

from kernel_testutil import assert_close, mlp_inputs, rel_err

T = sm.SparseMLPTuning
SLOW = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mlp_case(draw):
  d = draw(st.sampled_from([8, 24, 64, 100, 136]))
  d_ff = draw(st.integers(1, 96))
  k = draw(st.sampled_from([0, 1, d_ff, draw(st.integers(0, d_ff))]))
  b = draw(st.sampled_from([1, 1, 2, 5, 17]))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  biases = draw(st.booleans())
  count = draw(st.one_of(st.none(), st.integers(0, k)))
  variant = draw(st.sampled_from(["fused", "split"]))
  block_k = draw(st.sampled_from([4, 16])) if b == 1 else 16
  block_d = draw(st.sampled_from([16, 32, 128]))
  seed = draw(st.integers(0, 2**16))
  return d, d_ff, k, b, dtype, biases, count, variant, block_k, block_d, seed


@SLOW
@given(mlp_case())
def test_triton_matches_reference(case):
  d, d_ff, k, b, dtype, biases, count, variant, block_k, block_d, seed = case
  rng = np.random.default_rng(seed)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, b, d, d_ff, k, dtype, biases)
  ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count)
  out = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=count, impl="triton",
                      tuning=T(variant, block_k, block_d))
  assert out.shape == (b, d) and out.dtype == x.dtype
  assert_close(out, ref, dtype, f"{variant} {case}")


@SLOW
@given(mlp_case())
def test_masked_matches_reference(case):
  d, d_ff, k, b, dtype, biases, count, variant, block_k, block_d, seed = case
  rng = np.random.default_rng(seed)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, b, d, d_ff, k, dtype, biases)
  mask = jnp.asarray(rng.random((b, k)) < 0.5)
  ref = sm.sparse_mlp_masked_reference(x, w1, b1, w2t, b2, idx, mask, count=count)
  for impl in ("triton", "xla"):
    out = sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, mask, count=count, impl=impl,
                               tuning=T(variant, block_k, block_d))
    assert_close(out, ref, dtype, f"{impl} masked {case}")


def test_mask_really_drops_neurons():
  rng = np.random.default_rng(1)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 2, 32, 40, 12, jnp.float32)
  all_on = jnp.ones((2, 12), bool)
  row0_off = all_on.at[0].set(False)
  full = sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, all_on, impl="triton")
  part = sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, row0_off, impl="triton")
  np.testing.assert_allclose(part[0], b2, rtol=1e-6, atol=1e-6)  # no neuron: bias only
  np.testing.assert_allclose(part[1], full[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b", [1, 3])
def test_entries_past_count_are_ignored(b):
  """Garbage (even out-of-range) indices past `count` must not change the output."""
  rng = np.random.default_rng(2)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, b, 48, 64, 20, jnp.float32)
  junk = idx.at[15:].set(jnp.asarray([3, 3, 10**6, -5, 0], jnp.int32))
  ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx[:15])
  for variant in ("fused", "split"):
    out = sm.sparse_mlp(x, w1, b1, w2t, b2, junk, count=jnp.int32(15), impl="triton",
                        tuning=T(variant, 16 if b > 1 else 4, 16), checked=False)
    assert_close(out, ref, jnp.float32, variant)
  out = jax.jit(lambda c: sm.sparse_mlp(x, w1, b1, w2t, b2, junk, count=c, impl="xla",
                                        checked=False))(15)
  assert_close(out, ref, jnp.float32, "xla under jit")


def test_density_one_equals_dense_mlp():
  rng = np.random.default_rng(3)
  x, w1, b1, w2t, b2, _ = mlp_inputs(rng, 1, 64, 96, 0, jnp.float32)
  idx = jnp.asarray(rng.permutation(96), jnp.int32)
  dense = jnp.maximum(x @ w1.T + b1, 0) @ w2t + b2
  out = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, impl="triton")
  assert rel_err(out, dense) < 1e-5


def test_fc1_and_fc2_entry_points():
  rng = np.random.default_rng(4)
  for b, dtype in ((1, jnp.float32), (4, jnp.bfloat16)):
    x, w1, b1, w2t, b2, idx = mlp_inputs(rng, b, 40, 70, 33, dtype)
    for count in (None, 30):
      h_ref = sm.sparse_fc1_reference(x, w1, b1, idx, count=count)
      for impl in ("triton", "xla"):
        h = sm.sparse_fc1(x, w1, b1, idx, count=count, impl=impl, tuning=T(block_k=16, block_d=16))
        assert h.shape == (b, 33)
        assert_close(h, h_ref, dtype, f"fc1 {impl}")
        if count is not None:
          assert float(jnp.abs(h[:, count:].astype(jnp.float32)).max()) == 0.0
      y_ref = sm.sparse_fc2_reference(h_ref, w2t, b2, idx, count=count)
      for impl in ("triton", "xla"):
        y = sm.sparse_fc2(h_ref, w2t, b2, idx, count=count, impl=impl, tuning=T(block_k=16, block_d=16))
        assert_close(y, y_ref, dtype, f"fc2 {impl}")
      # fc1 then fc2 equals the fused MLP
      both = sm.sparse_fc2(sm.sparse_fc1(x, w1, b1, idx, count=count, impl="triton"), w2t, b2,
                           idx, count=count, impl="triton")
      assert_close(both, sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count), dtype,
                   "fc1+fc2")


def test_fc1_with_d_splits():
  """Few neuron blocks -> fc1 splits d across programs (partials summed)."""
  rng = np.random.default_rng(5)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 256, 64, 5, jnp.float32)
  t = T(block_k=4, block_d=32, fc1_splits=3)
  assert_close(sm.sparse_fc1(x, w1, b1, idx, impl="triton", tuning=t),
               sm.sparse_fc1_reference(x, w1, b1, idx), jnp.float32, "fc1 splits")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_mosaic_gpu_kernel_interpreted(dtype):
  rng = np.random.default_rng(6)
  d = 1024 if dtype == jnp.bfloat16 else 512
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, d, 40, 19, dtype)
  for count, tuning in ((None, mm.MosaicMLPTuning(rows_per_group=2, ctas=3)),
                        (jnp.int32(11), mm.MosaicMLPTuning(rows_per_group=1, ctas=4)),
                        (jnp.int32(17), mm.MosaicMLPTuning(rows_per_group=2, ctas=2, pipeline=True))):
    out = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=count, impl="mosaic", tuning=tuning)
    ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count)
    assert_close(out, ref, dtype, f"mosaic count={count}")
  no_bias = sm.sparse_mlp(x, w1, None, w2t, None, idx, impl="mosaic",
                          tuning=mm.MosaicMLPTuning(rows_per_group=4, ctas=2))
  assert_close(no_bias, sm.sparse_mlp_reference(x, w1, None, w2t, None, idx), dtype, "no bias")


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_mosaic_kernel_spreads_a_short_count(seed, data):
  """count well under k (a threshold's set): every CTA takes an equal share of the first
  `count` entries, none reads past them; count 0 gives the biases alone; with and without
  the software pipeline (group i+1's rows loaded before group i is computed), the TMA ring
  (rows copied into shared-memory slots, any depth; a last group's rows past the count
  re-read the CTA's first row and count as 0), and the
  programmatic-dependent-launch order (group 0's rows before the wait; past the count the
  set holds out-of-range garbage here, which that early load must not use)."""
  rng = np.random.default_rng(seed)
  k = data.draw(st.integers(4, 40))
  count = data.draw(st.integers(0, k))
  tma = data.draw(st.booleans())
  pdl = not tma and data.draw(st.booleans())
  r = data.draw(st.sampled_from([1, 2, 4]))
  tuning = mm.MosaicMLPTuning(rows_per_group=r, ctas=data.draw(st.integers(1, 6)),
                              pipeline=not tma and data.draw(st.booleans()), pdl=pdl, tma=tma,
                              stages=data.draw(st.integers(0, 16 // r)) if tma else 0)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 512, 64, k, jnp.float32)
  if pdl:
    idx = idx.at[count:].set(1 << 20)
  out = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=jnp.int32(count), impl="mosaic", tuning=tuning)
  ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count)
  assert_close(out, ref, jnp.float32, f"mosaic count={count}/{k} {tuning}")


def test_mosaic_falls_back_where_unsupported():
  """Batch > 1, a mask, or d not a multiple of the 16-byte row vectors -> Triton path."""
  rng = np.random.default_rng(7)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 2, 48, 30, 9, jnp.float32)
  assert not mm.supported(x, w1, None)
  out = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, impl="mosaic")
  assert_close(out, sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx), jnp.float32, "fallback")


def test_auto_is_xla_on_cpu():
  assert jax.default_backend() == "cpu"
  assert dispatch.backend_for("sparse_mlp") == "xla"
  rng = np.random.default_rng(8)
  args = mlp_inputs(rng, 2, 32, 40, 10, jnp.float32)
  np.testing.assert_array_equal(sm.sparse_mlp(*args), sm.sparse_mlp(*args, impl="xla"))


def test_under_jit_with_traced_count():
  rng = np.random.default_rng(9)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 64, 80, 24, jnp.float32)
  f = jax.jit(lambda x, idx, c: sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=c, impl="triton",
                                              tuning=T("fused", 8, 32)))
  for c in (0, 7, 24):
    assert_close(f(x, idx, c), sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=c),
                 jnp.float32, f"count={c}")


# ----------------------------------------------------------------------------- errors


def test_checked_mode_rejects_bad_indices():
  rng = np.random.default_rng(10)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 16, 20, 5, jnp.float32)
  with pytest.raises(ValueError, match="out of range"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx.at[2].set(20), impl="xla")
  with pytest.raises(ValueError, match="out of range"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx.at[0].set(-1), impl="xla")
  with pytest.raises(ValueError, match="more than once"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx.at[1].set(idx[3]), impl="xla")
  # past `count`, anything goes; checked=False skips the check
  sm.sparse_mlp(x, w1, b1, w2t, b2, idx.at[4].set(99), count=4, impl="xla")
  sm.sparse_mlp(x, w1, b1, w2t, b2, idx.at[1].set(idx[3]), impl="xla", checked=False)
  with pytest.raises(ValueError, match="count"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=6, impl="xla")


def test_bad_shapes_and_dtypes_are_rejected():
  rng = np.random.default_rng(11)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 2, 16, 20, 5, jnp.float32)
  cases = [
      ((x[0], w1, b1, w2t, b2, idx), ValueError, "x must have 2 dimensions"),
      ((x, w1, b1, w2t[:, :8], b2, idx), ValueError, "w2t must have shape"),
      ((x, w1, b1, w2t.astype(jnp.bfloat16), b2, idx), TypeError, "w2t must have dtype"),
      ((x, w1, b1[:3], w2t, b2, idx), ValueError, "b1 must have shape"),
      ((x.astype(jnp.int32), w1, b1, w2t, b2, idx), TypeError, "x must have dtype"),
      ((x, w1, b1, w2t, b2, idx.astype(jnp.float32)), TypeError, "idx must hold integers"),
      ((jnp.zeros((65, 16)), w1, b1, w2t, b2, idx), ValueError, "1 to 64 rows"),
  ]
  for args, exc, msg in cases:
    with pytest.raises(exc, match=msg):
      sm.sparse_mlp(*args, impl="xla")
  with pytest.raises(ValueError, match="mask must have shape"):
    sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, jnp.ones((2, 4)), impl="xla")
  with pytest.raises(ValueError, match="impl"):
    sm.sparse_mlp(x, w1, b1, w2t, b2, idx, impl="cuda")


@pytest.mark.parametrize("impl", ["mosaic", "triton", "xla", "reference"])
def test_f32_sum_without_b2(impl):
  """out_dtype=float32 with b2=None: the unrounded sum, which plus b2, rounded, is the default
  result (the decode step adds b2 in its boundary kernel, add_layer_norm)."""
  rng = np.random.default_rng(4)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 1024, 512, 40, jnp.bfloat16)
  raw = sm.sparse_mlp(x, w1, b1, w2t, None, idx, count=33, impl=impl, out_dtype=jnp.float32)
  assert raw.dtype == jnp.float32
  full = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=33, impl=impl)
  np.testing.assert_array_equal(np.asarray((raw + b2.astype(jnp.float32)).astype(jnp.bfloat16), np.float32),
                                np.asarray(full, np.float32))


@pytest.mark.parametrize("pipeline,pdl,tma", [(False, False, False), (True, False, False), (False, True, False),
                                              (True, True, False), (False, False, True)])
def test_mosaic_kernel_lowers_at_opt_shapes(pipeline, pdl, tma):
  """The Mosaic GPU kernel lowers to its MLIR module on the CPU at the OPT-13B and OPT-30B
  shapes (the final compile needs the GPU: scripts/profile_sparse_layer.py times it there);
  with pdl it waits for the kernel before it and is marked for a PDL launch."""
  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  for d, f, r in ((5120, 20480, 2), (7168, 28672, 1)):
    fn = functools.partial(mm._partials, tuning=mm.MosaicMLPTuning(rows_per_group=r, pipeline=pipeline, pdl=pdl,
                                                                    tma=tma), interpret=False)
    text = jax.jit(fn).trace(S((1, d), bf), S((f, d), bf), S((f,), bf), S((f, d), bf), S((f,), jnp.int32),
                             S((1,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert ("griddepcontrol.wait" in text) == pdl and ("mosaic_gpu.uses_pdl" in text) == pdl
    assert ("cp.async.bulk" in text) == tma  # TMA copies


def test_mosaic_default_tuning_follows_pdl(monkeypatch):
  """A call without a tuning takes `PDL` as it is at the call (a static part of the jit key)."""
  assert mm.default_tuning() == mm.MosaicMLPTuning()
  monkeypatch.setattr(mm, "PDL", True)
  assert mm.default_tuning() == mm.MosaicMLPTuning(pdl=True)
  monkeypatch.setattr(mm, "TMA", True)
  assert mm.default_tuning() == mm.MosaicMLPTuning(tma=True)


def test_tma_tuning_is_checked():
  """The TMA ring is its own pipeline (not with pipeline / pdl), its depth is >= 0 and only
  with tma, its barriers fit Mosaic GPU's 32, and it does not do the in-kernel atomic sum."""
  with pytest.raises(ValueError, match="own pipeline"):
    mm.MosaicMLPTuning(tma=True, pdl=True)
  with pytest.raises(ValueError, match="with tma=True"):
    mm.MosaicMLPTuning(stages=3)
  with pytest.raises(ValueError, match="at most 32"):
    mm.tma_stages(mm.MosaicMLPTuning(tma=True, stages=9), 2, 1024, 2)
  assert mm.tma_stages(mm.MosaicMLPTuning(tma=True), 1, 5120, 2) == 8  # 8 x 2 rows of 10 KB <= 192 KB
  assert mm.tma_stages(mm.MosaicMLPTuning(tma=True), 1, 12288, 2) == 4
  assert mm.tma_stages(mm.MosaicMLPTuning(tma=True), 4, 1024, 2) == 4  # 32 barriers
  rng = np.random.default_rng(9)
  x, w1, b1, w2t, b2, idx = mlp_inputs(rng, 1, 512, 32, 8, jnp.float32)
  with pytest.raises(ValueError, match="TMA kernel"):
    mm.sparse_mlp_mosaic(x, w1, b1, w2t, b2, idx, None, None, interpret=True,
                         tuning=mm.MosaicMLPTuning(tma=True), acc=jnp.zeros((1, 512), jnp.float32))
