"""Head-sparse attention kernels (Pallas, interpret mode on the CPU) against references."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import _triton_gemv as tg
from pallas_kernels import _triton_q_kv as tq
from pallas_kernels import dispatch
from pallas_kernels import sparse_attention as sa

from kernel_testutil import assert_close, pretend_hopper

SLOW = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
P = sa.HeadProjTuning


def _weights(rng, n_heads, hd, d, dtype, bias=True):
  s = 1.0 / np.sqrt(d)
  wqkv = jnp.asarray(rng.standard_normal((3, n_heads, hd, d)) * s, dtype)
  bqkv = jnp.asarray(rng.standard_normal((3, n_heads, hd)), dtype) if bias else None
  wo_t = jnp.asarray(rng.standard_normal((n_heads, hd, d)) * s, dtype)
  bo = jnp.asarray(rng.standard_normal(d), dtype) if bias else None
  return wqkv, bqkv, wo_t, bo


@st.composite
def proj_case(draw):
  n_heads = draw(st.integers(1, 6))
  hd = draw(st.sampled_from([4, 8, 12, 16]))
  d = draw(st.sampled_from([16, 40, 64]))
  k_h = draw(st.integers(0, n_heads))
  b = draw(st.sampled_from([1, 1, 3, 16]))
  dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
  which = draw(st.sampled_from([(0, 1, 2), (0,), (2, 0)]))
  bias = draw(st.booleans())
  tuning = draw(st.sampled_from([P(), P(block_k=4, block_d=16, splits=2),
                                 P(block_k=16, block_d=32, splits=1)]))
  seed = draw(st.integers(0, 2**16))
  return n_heads, hd, d, k_h, b, dtype, which, bias, tuning, seed


@SLOW
@given(proj_case())
def test_projections_match_reference(case):
  n_heads, hd, d, k_h, b, dtype, which, bias, tuning, seed = case
  if b > 1 and tuning.block_k and tuning.block_k < 16:
    tuning = P(block_k=16, block_d=16, splits=2)  # the batched (dot) path needs >= 16 rows
  rng = np.random.default_rng(seed)
  wqkv, bqkv, wo_t, bo = _weights(rng, n_heads, hd, d, dtype, bias)
  heads = jnp.asarray(rng.permutation(n_heads)[:k_h], jnp.int32)
  x = jnp.asarray(rng.standard_normal((b, d)), dtype)
  ref = sa.head_sparse_qkv_reference(x, wqkv, bqkv, heads, which=which)
  out = sa.head_sparse_qkv(x, wqkv, bqkv, heads, which=which, impl="triton", tuning=tuning)
  assert out.shape == (len(which), b, k_h, hd)
  if k_h:
    assert_close(out, ref, dtype, f"qkv {case}")
  o = jnp.asarray(rng.standard_normal((b, k_h, hd)), dtype)
  ref = sa.head_sparse_out_reference(o, wo_t, bo, heads)
  out = sa.head_sparse_out(o, wo_t, bo, heads, impl="triton", tuning=tuning)
  assert out.shape == (b, d)
  assert_close(out, ref, dtype, f"out {case}")


def test_projections_xla_path_and_all_heads_equal_dense():
  rng = np.random.default_rng(0)
  n_heads, hd, d = 4, 8, 32
  wqkv, bqkv, wo_t, bo = _weights(rng, n_heads, hd, d, jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
  heads = jnp.asarray([2, 0, 3, 1], jnp.int32)
  dense_q = (x @ wqkv[0].reshape(n_heads * hd, d).T + bqkv[0].reshape(-1)).reshape(2, n_heads, hd)
  for impl in ("triton", "xla"):
    q = sa.head_sparse_qkv(x, wqkv, bqkv, heads, which=(0,), impl=impl)[0]
    np.testing.assert_allclose(q, dense_q[:, heads], rtol=1e-5, atol=1e-5)
    o = jnp.asarray(rng.standard_normal((2, n_heads, hd)), jnp.float32)
    dense_out = o[:, np.argsort(np.asarray(heads))].reshape(2, -1) @ wo_t.reshape(-1, d) + bo
    np.testing.assert_allclose(sa.head_sparse_out(o, wo_t, bo, heads, impl=impl), dense_out,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,seq,hd,block_s,splits", [(1, 37, 16, 16, 0), (3, 64, 12, 8, 3),
                                                     (2, 5, 8, 64, 1)])
def test_decode_attention_matches_reference(dtype, b, seq, hd, block_s, splits):
  rng = np.random.default_rng(seq)
  n_heads, k_h = 5, 3
  heads = jnp.asarray(rng.permutation(n_heads)[:k_h], jnp.int32)
  q = jnp.asarray(rng.standard_normal((b, k_h, hd)) / np.sqrt(hd), dtype)
  kc = jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), dtype)
  vc = jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), dtype)
  mask = jnp.asarray(rng.random((b, seq)) < 0.7).at[:, 0].set(True)
  ref = sa.head_sparse_decode_attention_reference(q, kc, vc, heads, mask)
  t = sa.DecodeAttentionTuning(block_s=block_s, seq_splits=splits)
  for impl in ("triton", "xla"):
    out = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, impl=impl, tuning=t)
    assert out.shape == (b, k_h, hd)
    assert_close(out, ref, dtype, impl)


@SLOW
@given(b=st.sampled_from([1, 2]), n_heads=st.integers(1, 6), seq=st.integers(1, 40), hd=st.sampled_from([8, 12, 16]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), hv_dtype=st.sampled_from([jnp.bool_, jnp.int8]),
       data=st.data())
def test_decode_attention_with_head_valid_matches_reference(b, n_heads, seq, hd, dtype, hv_dtype, data):
  """kv_policy "selected": each head attends only over its own valid slots (head_valid), on top
  of kv_mask; a head with no valid slot gives zeros."""
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
  q = jnp.asarray(rng.standard_normal((b, heads.shape[0], hd)) / np.sqrt(hd), dtype)
  kc, vc = (jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), dtype) for _ in range(2))
  mask = jnp.asarray(rng.random((b, seq)) < 0.8)
  head_valid = jnp.asarray(rng.random((b, n_heads, seq)) < data.draw(st.sampled_from([0.0, 0.3, 0.9]))).astype(hv_dtype)
  ref = sa.head_sparse_decode_attention_reference(q, kc, vc, heads, mask, head_valid)
  want = sa.head_sparse_decode_attention_reference(q, kc, vc, heads, mask)
  none = ~np.asarray((np.asarray(mask)[:, None] & (np.asarray(head_valid)[:, np.asarray(heads)] != 0)).any(-1))
  np.testing.assert_array_equal(np.asarray(ref, np.float32)[none], 0.0)  # the reference's own contract
  if np.asarray(head_valid).all():
    assert_close(ref, want, dtype, "all valid = no head_valid")
  t = sa.DecodeAttentionTuning(block_s=data.draw(st.sampled_from([8, 64])), seq_splits=data.draw(st.sampled_from([0, 1, 2])))
  for impl in ("triton", "xla"):
    out = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, head_valid=head_valid, impl=impl, tuning=t)
    assert out.shape == q.shape and out.dtype == q.dtype
    if np.abs(np.asarray(ref, np.float32)).max() > 0:
      assert_close(out, ref, dtype, impl)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[none], 0.0)


@SLOW
@given(b=st.sampled_from([1, 1, 3]), n_heads=st.integers(1, 6), seq=st.integers(1, 40), hd=st.sampled_from([8, 16]),
       d=st.sampled_from([32, 64]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), data=st.data())
def test_out_projection_combines_attention_partials(b, n_heads, seq, hd, d, dtype, data):
  """head_sparse_out of the attention's split outputs (combine=False) = head_sparse_out of
  the combined output: the Triton kernel combines per tile, the other paths first; rows or
  heads with no valid position give zeros."""
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
  q = jnp.asarray(rng.standard_normal((b, heads.shape[0], hd)) / np.sqrt(hd), dtype)
  kc, vc = (jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), dtype) for _ in range(2))
  mask = jnp.asarray(rng.random((b, seq)) < data.draw(st.sampled_from([0.0, 0.5, 1.0])))
  _, _, wo_t, bo = _weights(rng, n_heads, hd, d, dtype)
  t = sa.DecodeAttentionTuning(block_s=8, seq_splits=data.draw(st.sampled_from([0, 1, 3])))
  out_dtype = data.draw(st.sampled_from([None, jnp.float32]))
  want = sa.head_sparse_out_reference(sa.head_sparse_decode_attention_reference(q, kc, vc, heads, mask), wo_t, bo,
                                      heads, out_dtype=out_dtype)
  for impl in ("triton", "xla", "reference"):
    parts = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, impl=impl, tuning=t, combine=False)
    assert isinstance(parts, sa.AttentionPartials) and parts.o.shape[1:] == q.shape
    got = sa.head_sparse_out(parts, wo_t, bo, heads, impl=impl, out_dtype=out_dtype)
    assert got.shape == (b, d) and got.dtype == jnp.dtype(out_dtype or dtype)
    assert_close(got, want, dtype, f"{impl} out of partials")
    same = sa.head_sparse_out(parts.combine(), wo_t, bo, heads, impl=impl, out_dtype=out_dtype)
    assert_close(got, same, dtype, f"{impl} in-kernel vs XLA combine")
  with pytest.raises(ValueError, match="o.m must have shape"):
    sa.head_sparse_out(parts._replace(m=parts.m[:, :, :0]), wo_t, bo, heads)


def test_decode_attention_reads_selected_heads_and_handles_empty_rows():
  rng = np.random.default_rng(1)
  b, n_heads, seq, hd = 2, 4, 20, 8
  q = jnp.asarray(rng.standard_normal((b, 2, hd)), jnp.float32)
  kc = jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), jnp.float32)
  vc = jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), jnp.float32)
  mask = jnp.ones((b, seq), bool).at[1].set(False)  # row 1 has no valid position
  heads = jnp.asarray([3, 1], jnp.int32)
  out = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, impl="triton")
  assert float(jnp.abs(out[1]).max()) == 0.0
  # unselected heads' cache may hold anything (NaN too): it is never read
  poisoned = kc.at[:, 0].set(jnp.nan).at[:, 2].set(jnp.nan)
  out2 = sa.head_sparse_decode_attention(q, poisoned, vc, heads, mask, impl="triton")
  np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)
  p = jax.nn.softmax(jnp.einsum("he,hse->hs", q[0], kc[0, heads]), axis=-1)
  np.testing.assert_allclose(out[0], jnp.einsum("hs,hse->he", p, vc[0, heads]), rtol=1e-5,
                             atol=1e-5)


def test_errors_and_dispatch():
  rng = np.random.default_rng(2)
  wqkv, bqkv, wo_t, bo = _weights(rng, 3, 4, 8, jnp.float32)
  x = jnp.zeros((1, 8), jnp.float32)
  with pytest.raises(ValueError, match="out of range"):
    sa.head_sparse_qkv(x, wqkv, bqkv, jnp.asarray([0, 3], jnp.int32))
  with pytest.raises(ValueError, match="more than once"):
    sa.head_sparse_out(jnp.zeros((1, 2, 4)), wo_t, bo, jnp.asarray([1, 1], jnp.int32))
  with pytest.raises(ValueError, match="which"):
    sa.head_sparse_qkv(x, wqkv, bqkv, jnp.asarray([0], jnp.int32), which=(0, 3))
  with pytest.raises(ValueError, match="wqkv must have shape"):
    sa.head_sparse_qkv(jnp.zeros((1, 9)), wqkv, bqkv, jnp.asarray([0], jnp.int32))
  with pytest.raises(ValueError, match="kv_mask must have shape"):
    sa.head_sparse_decode_attention(jnp.zeros((1, 1, 4)), jnp.zeros((1, 3, 5, 4)),
                                    jnp.zeros((1, 3, 5, 4)), jnp.asarray([0], jnp.int32),
                                    jnp.ones((1, 6), bool))
  for op in dispatch.OPS:
    assert dispatch.backend_for(op) == "xla"  # CPU: the portable path
  with pytest.raises(ValueError, match="Unknown op"):
    dispatch.backend_for("dense_mlp")
  assert set(dispatch.HOPPER_TABLE.values()) <= {"mosaic", "triton", "xla"}


@SLOW
@given(n_heads=st.integers(1, 6), hd=st.sampled_from([4, 8, 16, 32]), d=st.sampled_from([16, 40, 64]),
       b=st.sampled_from([1, 1, 2, 16]), seq=st.integers(1, 9), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       bias=st.booleans(), data=st.data())
def test_q_kv_update_matches_reference(n_heads, hd, d, b, seq, dtype, bias, data):
  """One kernel for q of the selected heads and every head's K/V written into the caches at
  the slot: q within rounding, the written slot within rounding, every other slot unchanged."""
  seed = data.draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  wqkv, bqkv, _, _ = _weights(rng, n_heads, hd, d, dtype, bias)
  heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
  x = jnp.asarray(rng.standard_normal((b, d)), dtype)
  kc, vc = (jnp.asarray(rng.standard_normal((b, n_heads, seq, hd)), dtype) for _ in range(2))
  slot = jnp.int32(data.draw(st.integers(0, seq - 1)))
  tuning = data.draw(st.sampled_from([None, P(block_k=2, block_d=16)]))
  kv_heads = data.draw(st.sampled_from(["all", "selected"]))
  q, k2, v2 = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads=kv_heads,
                                         impl="triton", tuning=tuning)
  rq, rk, rv = sa.head_sparse_q_kv_update_reference(x, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5,
                                                    kv_heads=kv_heads)
  assert q.shape == (b, heads.shape[0], hd) and q.dtype == dtype
  assert_close(q, rq, dtype, "q")
  written = np.zeros((n_heads, seq), bool)  # (head, slot) pairs the step writes
  written[np.arange(n_heads) if kv_heads == "all" else np.asarray(heads), int(slot)] = True
  for got, want, old in ((k2, rk, kc), (v2, rv, vc)):
    assert got.shape == old.shape and got.dtype == old.dtype
    assert_close(np.asarray(got, np.float32)[:, written], np.asarray(want, np.float32)[:, written], dtype, "new K/V")
    np.testing.assert_array_equal(np.asarray(got, np.float32)[:, ~written], np.asarray(old, np.float32)[:, ~written])
    np.testing.assert_array_equal(np.asarray(want, np.float32)[:, ~written], np.asarray(old, np.float32)[:, ~written])
  xq, xk, xv = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads=kv_heads,
                                          impl="xla")
  assert_close(xq, rq, dtype, "xla q")
  assert_close(xk, rk, dtype, "xla k")
  assert_close(xv, rv, dtype, "xla v")
  if kv_heads == "selected":  # the same call can mark the selected heads' slots valid (in place)
    hv = jnp.asarray(rng.random((b, n_heads, seq)) < 0.3).astype(data.draw(st.sampled_from([jnp.bool_, jnp.int8])))
    want = np.asarray(hv).copy()
    want[:, np.asarray(heads), int(slot)] = 1
    for impl in ("triton", "xla", "reference"):
      got = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads=kv_heads,
                                       head_valid=hv, impl=impl, tuning=tuning)
      assert len(got) == 4 and got[3].dtype == hv.dtype
      np.testing.assert_array_equal(np.asarray(got[3]), want)
      assert_close(got[1], rk, dtype, f"{impl} k with head_valid")


@SLOW
@given(n_heads=st.integers(1, 5), hd=st.sampled_from([4, 8, 16]), d=st.sampled_from([16, 40, 64]),
       layers=st.integers(1, 3), rm=st.integers(1, 24), rh=st.integers(1, 12),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), data=st.data())
def test_q_kv_update_with_side_gemv_matches_reference(n_heads, hd, d, layers, rm, rh, dtype, data):
  """The predictors' first GEMV (`SideGemv` over `stack_w1t`'s rows) and an MLP set's scatter
  (`TileSets`) on extra programs of the q + K/V launch: the GEMV within rounding of the
  reference and of the predictors' own definition, the scatter exact, and q / K / V /
  head_valid as without them."""
  from pallas_kernels import hosted_sets as hs
  from pallas_kernels import predict_sets as ps

  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  wqkv, bqkv, _, _ = _weights(rng, n_heads, hd, d, dtype)
  heads = jnp.asarray(rng.permutation(n_heads)[:data.draw(st.integers(1, n_heads))], jnp.int32)
  seq = 4
  x = jnp.asarray(rng.standard_normal((1, d)), dtype)
  kc, vc = (jnp.asarray(rng.standard_normal((1, n_heads, seq, hd)), dtype) for _ in range(2))
  w1m, w1h = (jnp.asarray(rng.standard_normal((layers, d, r)) / np.sqrt(d), dtype) for r in (rm, rh))
  layer = data.draw(st.integers(0, layers - 1))
  xs = jnp.asarray(rng.standard_normal((1, d)) * 3 + 1, dtype)  # the residual: off-centre, not unit
  side = hs.hidden_gemv(xs, hs.stack_w1t(w1m, w1h), layer, rm, rh)
  kv_heads = data.draw(st.sampled_from(["all", "selected"]))
  hv = jnp.zeros((1, n_heads, seq), bool) if kv_heads == "selected" else None
  tuning = data.draw(st.sampled_from([None, P(block_k=2, block_d=16)]))
  # an MLP set before its scatter: tiles of T lanes, members first (ascending), any cap k
  n_tiles, tile = data.draw(st.integers(1, 9)), data.draw(st.sampled_from([1, 4, 16]))
  cnt = rng.integers(0, tile + 1, n_tiles)
  loc = np.zeros((n_tiles, tile), np.int32)
  for t in range(n_tiles):
    loc[t, :cnt[t]] = t * tile + np.sort(rng.permutation(tile)[:cnt[t]])
  ts = ps.TileSets(jnp.asarray(loc), jnp.asarray(cnt, jnp.int32), data.draw(st.integers(1, n_tiles * tile)))
  members = np.concatenate([loc[t, :cnt[t]] for t in range(n_tiles)])
  want_idx = np.zeros(ts.k, np.int32)
  want_idx[:min(len(members), ts.k)] = members[:ts.k]
  kw = dict(q_scale=hd**-0.5, kv_heads=kv_heads, head_valid=hv)
  got = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, 2, side=side, scatter=ts, impl="triton",
                                   tuning=tuning, **kw)
  plain = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, 2, impl="triton", tuning=tuning, **kw)
  ref = sa.head_sparse_q_kv_update_reference(x, wqkv, bqkv, heads, kc, vc, 2, side=side, scatter=ts, **kw)
  assert len(got) == len(plain) + 3 == len(ref)
  for a, b in zip(got, plain):  # the extra programs change nothing else
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  first = tq.EXTRA_PROGRAMS_FIRST
  try:  # the hosted programs at the other end of the grid: the same results
    tq.EXTRA_PROGRAMS_FIRST = not first
    other = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, 2, side=side, scatter=ts, impl="triton",
                                       tuning=tuning, **kw)
  finally:
    tq.EXTRA_PROGRAMS_FIRST = first
  for a, b in zip(got, other):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for idx, count in (got[-2:], ref[-2:], hs.scatter_sets(ts), hs.scatter_sets(ts, impl="xla")):
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    assert count.shape == () and int(count) == min(len(members), ts.k)
  got, ref = got[:-2], ref[:-2]
  h = got[-1]
  assert h.shape == (1, rm + rh) and h.dtype == jnp.float32
  assert_close(h, ref[-1], dtype, "side GEMV")
  z = ps.standardize(xs).astype(dtype)
  want = jnp.concatenate([jnp.einsum("bd,dr->br", z, w[layer], preferred_element_type=jnp.float32)
                          for w in (w1m, w1h)], axis=1)
  assert_close(h, want, dtype, "the predictors' first GEMV")
  xla = sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, vc, 2, side=side, scatter=ts, impl="xla", **kw)
  assert_close(xla[-3], ref[-1], dtype, "xla side GEMV")
  np.testing.assert_array_equal(np.asarray(xla[-2]), want_idx)


def test_q_kv_update_lowers_for_hopper_and_checks_input(monkeypatch):
  pretend_hopper(monkeypatch)
  S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
  for b, H, hd, sel, side in ((1, 40, 128, False, False), (1, 56, 128, False, True), (4, 40, 128, False, False),
                              (1, 40, 128, True, True)):
    d = H * hd  # OPT-13B, OPT-30B, a batch; K/V of the selected heads only (marking head_valid); with the
    t = sa._proj_tuning(None, b, 3 * H * hd, d)  # next layer's predictor hidden (rank 256 + 128, 40 layers)
    fn = functools.partial(tq.gather_matvec_q_kv_cache, q_scale=hd**-0.5, tuning=t, kv_selected=sel,
                           side=(5 * 384, 384, 1e-5) if side else None, scatter_k=20480 if side else None,
                           interpret=False)  # and the MLP set's scatter (320 tiles of 64 neurons)
    text = jax.jit(fn).trace(S((b, d), bf), S((3 * H * hd, d), bf), S((3 * H * hd,), bf), S((H // 2,), jnp.int32),
                             S((b, H, 256, hd), bf), S((b, H, 256, hd), bf), S((1,), jnp.int32),
                             S((b, H, 256), jnp.bool_) if sel else None, S((1, d), bf) if side else None,
                             S((40 * 384, d), bf) if side else None, S((320, 64), jnp.int32) if side else None,
                             S((320,), jnp.int32) if side else None).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "dejavu_q_kv_cache" in text
  att = functools.partial(sa._decode_attention_triton, tuning=sa.DecodeAttentionTuning(), interpret=False)
  text = jax.jit(att).trace(S((1, 20, 128), bf), S((1, 40, 2048, 128), bf), S((1, 40, 2048, 128), bf),
                            S((20,), jnp.int32), S((1, 2048), jnp.bool_), S((1, 40, 2048), jnp.bool_)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "dejavu_head_sparse_decode_attention" in text  # with head_valid (bool, loaded as bytes)
  one = functools.partial(sa._decode_attention_triton, tuning=sa.DecodeAttentionTuning(seq_splits=1), interpret=False,
                          partials=False)  # one split: the output normalized in the kernel, no combine
  lowered = jax.jit(one).trace(S((1, 20, 128), bf), S((1, 40, 192, 128), bf), S((1, 40, 192, 128), bf),
                               S((20,), jnp.int32), S((1, 192), jnp.bool_)).lower(lowering_platforms=("cuda",))
  assert "dejavu_head_sparse_decode_attention" in lowered.as_text()
  assert [o.shape for o in jax.tree.leaves(lowered.out_info)] == [(1, 20, 128)]
  t = sa._proj_tuning(None, 1, 20 * 128, 5120, op="out")
  out = functools.partial(tg.gather_matvec_t, k=20 * 128, tuning=dataclasses.replace(t, splits=53),
                          rowmap=("heads", 128), h_dtype=jnp.dtype(bf), interpret=False)
  text = jax.jit(out).trace(S((11, 1, 20 * 128), jnp.float32), S((40 * 128, 5120), bf), S((20,), jnp.int32),
                            S((1,), jnp.int32), None, None, (S((11, 1, 20), jnp.float32),) * 2).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "dejavu_gather_matvec_t" in text  # the out-projection combining attention partials
  monkeypatch.undo()
  rng = np.random.default_rng(0)
  wqkv, bqkv, _, _ = _weights(rng, 4, 8, 16, jnp.float32)
  x, kc, heads = jnp.zeros((1, 16)), jnp.zeros((1, 4, 5, 8)), jnp.asarray([0, 2], jnp.int32)
  with pytest.raises(ValueError, match="outside the cache"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 5)
  with pytest.raises(ValueError, match="integer scalar"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1.0)
  with pytest.raises(ValueError, match="k_cache must have shape"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, jnp.zeros((1, 3, 5, 8)), kc, 1)
  with pytest.raises(TypeError, match="v_cache must have dtype"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc.astype(jnp.bfloat16), 1)
  with pytest.raises(ValueError, match="out of range"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, jnp.asarray([0, 4], jnp.int32), kc, kc, 1)
  with pytest.raises(ValueError, match="head_valid goes with"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1, head_valid=jnp.ones((1, 4, 5), bool))
  with pytest.raises(ValueError, match="head_valid must have shape"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1, kv_heads="selected", head_valid=jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="kv_heads must be"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1, kv_heads="some")
  from pallas_kernels.hosted_sets import SideGemv, stack_w1t
  with pytest.raises(ValueError, match="side x must have shape"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1, side=SideGemv(jnp.zeros((2, 16)), jnp.zeros((8, 16)), 0, 8))
  with pytest.raises(ValueError, match="side rows"):
    sa.head_sparse_q_kv_update(x, wqkv, bqkv, heads, kc, kc, 1, side=SideGemv(x, jnp.zeros((8, 16)), 4, 8))
  with pytest.raises(ValueError, match="the predictors' w1 differ"):
    stack_w1t(jnp.zeros((2, 16, 4)), jnp.zeros((2, 16, 4), jnp.bfloat16))
  with pytest.raises(ValueError, match="head_valid must have shape"):
    sa.head_sparse_decode_attention(jnp.zeros((1, 2, 8)), kc, kc, heads, jnp.ones((1, 5), bool),
                                    head_valid=jnp.ones((1, 5), bool))
  with pytest.raises(TypeError, match="head_valid must have dtype"):
    sa.head_sparse_decode_attention(jnp.zeros((1, 2, 8)), kc, kc, heads, jnp.ones((1, 5), bool),
                                    head_valid=jnp.ones((1, 4, 5), jnp.float32))


@pytest.mark.parametrize("impl", ["triton", "xla", "reference"])
def test_out_projection_f32_without_bias(impl):
  """out_dtype=float32 with bo=None: the unrounded sum, which plus bo, rounded, is the default."""
  rng = np.random.default_rng(3)
  _, _, wo_t, bo = _weights(rng, 6, 8, 40, jnp.bfloat16)
  heads = jnp.asarray([4, 1, 3], jnp.int32)
  o = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.bfloat16)
  raw = sa.head_sparse_out(o, wo_t, None, heads, impl=impl, out_dtype=jnp.float32)
  assert raw.dtype == jnp.float32
  full = sa.head_sparse_out(o, wo_t, bo, heads, impl=impl)
  np.testing.assert_array_equal(np.asarray((raw + bo.astype(jnp.float32)).astype(jnp.bfloat16), np.float32),
                                np.asarray(full, np.float32))
