"""A layer's sets run on extra programs of other launches (`pallas_kernels.hosted_sets`): the
scores in the out-projection's or the attention's launch, in interpret mode on the CPU against the references,
and its lowering for Hopper. (The hidden and the scatter in the q + K/V launch are tested
with it in test_sparse_attention.py.)"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import _triton_gemv as tg
from pallas_kernels import decode_attention as da
from pallas_kernels import hosted_sets as hs
from pallas_kernels import predict_sets as ps
from pallas_kernels import sparse_attention as sa

from kernel_testutil import SETS_TOL, assert_close, draw_sets_problem, pretend_hopper

SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = SETS_TOL


def _draw_job(data, L, d, rm, rh, f, n_heads, dtype):
    """(x, predictors, threshold, layer, a `ScoresJob` on x's hidden, a key)."""
    x, mlp, head, layer, threshold, mlp_k, head_k = draw_sets_problem(data, L, d, rm, rh, f, n_heads, dtype,
                                                                      [-1e30, -0.5, 0.0, 0.7, 1e30])
    hidden = hs.side_gemv_reference(hs.hidden_gemv(x, hs.stack_w1t(mlp[0], head[0]), layer, rm, rh))
    job = hs.scores_job(mlp, head, threshold, hidden, layer=layer, mlp_k=mlp_k, head_k=head_k,
                        tile=data.draw(st.sampled_from([0, 16, 64, 256])))
    return x, mlp, head, threshold, layer, job, jax.random.key(data.draw(st.integers(0, 2**31 - 1)))


def _check_hosted(fn, plain, job, x, mlp, head, threshold, layer, dtype, exact=True):
    """fn(impl) -> (out, (heads, TileSets)) with the job hosted: Triton's out equal to ``plain``
    (within the dtype's tolerance unless ``exact``) and its sets those of the predictors'
    reference (up to scores within rounding of the threshold or of each other); the XLA and
    reference paths give the job's reference exactly."""
    out, (top, tiles) = fn("triton")
    if exact:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    else:
        assert_close(out, plain, jnp.dtype(dtype), "triton, hosting")
    idx, count = hs.scatter_sets_reference(tiles)
    assert ps.sets_disagreement((top, idx, count), x, mlp, head, threshold, layer=layer, mlp_k=job.mlp_k,
                                head_k=job.head_k, tol=TOL[dtype]) == []
    want_top, want_tiles = hs.scores_job_reference(job)
    for impl in ("xla", "reference"):
        got_out, (got_top, got_tiles) = fn(impl)
        assert_close(got_out, plain, jnp.dtype(dtype), impl)
        np.testing.assert_array_equal(np.asarray(got_top), np.asarray(want_top))
        for a, b in zip(got_tiles[:2], want_tiles[:2]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@SLOW
@given(L=st.integers(1, 3), d=st.sampled_from([16, 48, 64]), rm=st.integers(1, 40), rh=st.integers(1, 20),
       f=st.integers(1, 400), n_heads=st.integers(2, 12), hd=st.sampled_from([4, 8]),
       dtype=st.sampled_from(["float32", "bfloat16"]), data=st.data())
def test_scores_in_the_out_projection_launch(L, d, rm, rh, f, n_heads, hd, dtype, data):
    """The out-projection with a `ScoresJob`: the same output as without it, the next layer's
    sets as `_check_hosted` says."""
    x, mlp, head, threshold, layer, job, key = _draw_job(data, L, d, rm, rh, f, n_heads, dtype)
    k_h = data.draw(st.integers(1, n_heads))
    heads = jnp.asarray(np.random.default_rng(0).permutation(n_heads)[:k_h], jnp.int32)
    o = jax.random.normal(jax.random.fold_in(key, 4), (1, k_h, hd)).astype(dtype)
    wo_t = (jax.random.normal(jax.random.fold_in(key, 5), (n_heads, hd, d)) / np.sqrt(hd)).astype(dtype)
    plain = sa.head_sparse_out(o, wo_t, None, heads, impl="triton", out_dtype=jnp.float32)
    _check_hosted(lambda impl: sa.head_sparse_out(o, wo_t, None, heads, impl=impl, out_dtype=jnp.float32, scores=job),
                  plain, job, x, mlp, head, threshold, layer, dtype)


@settings(SLOW, max_examples=5)  # (interpret mode runs every program of the grid: kept small for CI)
@given(L=st.integers(1, 3), d=st.sampled_from([16, 48]), rm=st.integers(1, 40), rh=st.integers(1, 20),
       f=st.integers(1, 200), n_heads=st.integers(2, 12), hd=st.sampled_from([4, 8]), seq=st.integers(1, 24),
       dtype=st.sampled_from(["float32", "bfloat16"]), combine=st.booleans(), data=st.data())
def test_scores_in_the_attention_launch(L, d, rm, rh, f, n_heads, hd, seq, dtype, combine, data):
    """The decode attention with a `ScoresJob` (on grid rows after the heads', for any split
    count): the same output (or split partials) as without it up to the last bits (in
    interpret mode the hosting kernel's branches compile the same arithmetic apart), the sets
    as `_check_hosted` says; a batch of 2 is refused."""
    x, mlp, head, threshold, layer, job, key = _draw_job(data, L, d, rm, rh, f, n_heads, dtype)
    k_h = data.draw(st.integers(1, n_heads))
    heads = jnp.asarray(np.random.default_rng(1).permutation(n_heads)[:k_h], jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 4), (1, k_h, hd)).astype(dtype)
    kc, vc = (jax.random.normal(jax.random.fold_in(key, 5 + i), (1, n_heads, seq, hd)).astype(dtype) for i in range(2))
    mask = jax.random.bernoulli(jax.random.fold_in(key, 7), 0.8, (1, seq))
    t = sa.DecodeAttentionTuning(block_s=data.draw(st.sampled_from([4, 8, 64])),
                                 seq_splits=data.draw(st.integers(0, 4)))

    def attend(impl, **kw):
        out = sa.head_sparse_decode_attention(q, kc, vc, heads, mask, impl=impl, tuning=t, combine=combine, **kw)
        parts = out[0] if kw else out
        got = parts if combine else parts.combine()
        return (got, out[1]) if kw else got

    _check_hosted(functools.partial(attend, scores=job), attend("triton"), job, x, mlp, head, threshold, layer, dtype,
                  exact=False)
    with pytest.raises(ValueError, match="batch 1"):
        two = [jnp.concatenate([a, a]) for a in (q, kc, vc)]
        sa.head_sparse_decode_attention(*two, heads, jnp.concatenate([mask, mask]), impl="triton", scores=job)


def test_scores_job_bad_input_and_hopper_lowering(monkeypatch):
    mlp = (jnp.zeros((2, 8, 4)), jnp.zeros((2, 4, 16)), jnp.zeros((2, 16)))
    head = (jnp.zeros((2, 8, 4)), jnp.zeros((2, 4, 6)), jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match="hidden must have shape"):
        hs.scores_job(mlp, head, 0.0, jnp.zeros((1, 4)), layer=0, mlp_k=4, head_k=2)
    pretend_hopper(monkeypatch)
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    for d, r, f, H in ((5120, 256, 20480, 40), (7168, 512, 28672, 56)):  # OPT-13B and OPT-30B, 40 layers
        mlp = (S((40, d, r), bf), S((40, r, f), bf), S((40, f), bf))
        head = (S((40, d, r), bf), S((40, r, H), bf), S((40, H), bf))
        job = jax.eval_shape(lambda m, h: hs.scores_job(m, h, 0.5, jnp.zeros((1, 2 * r)), layer=3, mlp_k=f,
                                                        head_k=H // 2)[:6], mlp, head)
        static = hs.ScoresJob(*job, 3, f, H // 2, ps.auto_tuning(d, r, f).tile).static
        t = sa._proj_tuning(None, 1, H // 2 * 128, d, op="out")
        fn = functools.partial(tg.gather_matvec_t, k=H // 2 * 128, tuning=dataclasses.replace(t, splits=53),
                               rowmap=("heads", 128), scores=static, interpret=False)
        text = jax.jit(fn).trace(S((1, H // 2 * 128), bf), S((H * 128, d), bf), S((H // 2,), jnp.int32),
                                 S((1,), jnp.int32), None, None, None, tuple(job)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "dejavu_gather_matvec_t" in text
        k_h = H // 2
        attn = functools.partial(da._decode_attention_triton, tuning=da.DecodeAttentionTuning(), interpret=False,
                                 scores=static)
        cache = S((1, H, 192, 128), bf)
        text = jax.jit(attn).trace(S((1, k_h, 128), bf), cache, cache, S((k_h,), jnp.int32), S((1, 192), jnp.bool_),
                                   None, tuple(job)).lower(lowering_platforms=("cuda",)).as_text()
        assert "dejavu_head_sparse_decode_attention" in text
