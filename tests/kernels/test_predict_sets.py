"""predict_sets (three Pallas Triton kernels, interpret mode on the CPU) against its reference,
its lowering for Hopper, and the decode path that takes its sets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pallas_kernels import hosted_sets as hs
from pallas_kernels import predict_sets as ps

from kernel_testutil import SETS_TOL, draw_sets_problem, pretend_hopper, random_predictor

SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = SETS_TOL


def _check_sets(got, x, mlp, head, threshold, layer, mlp_k, head_k, tol):
    assert ps.sets_disagreement(got, x, mlp, head, threshold, layer=layer, mlp_k=mlp_k, head_k=head_k, tol=tol) == []


@SLOW
@given(L=st.integers(1, 3), d=st.integers(8, 700), rm=st.integers(1, 80), rh=st.integers(1, 40),
       f=st.integers(1, 900), h=st.integers(1, 40), data=st.data(), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_triton_equals_reference(L, d, rm, rh, f, h, data, dtype):
    """Random shapes (not multiples of the tiles), every layer of a stack, thresholds from far
    below every score to above most, caps below and above the count, several tunings."""
    x, mlp, head, layer, threshold, mlp_k, head_k = draw_sets_problem(data, L, d, rm, rh, f, h, dtype,
                                                                      [-1e30, -1.0, 0.0, 0.7, 2.0])
    tuning = data.draw(st.sampled_from([None, ps.SetsTuning(rows=64, cols=16, tile=32),
                                        ps.SetsTuning(rows=128, cols=8, tile=16, warps=(4, 4, 4)),
                                        ps.SetsTuning(rows=64, cols=16, tile=32, prep="xla")]))
    got = ps.predict_sets(x, mlp, head, threshold, layer=layer, mlp_k=mlp_k, head_k=head_k, impl="triton",
                          tuning=tuning)
    _check_sets(got, x, mlp, head, threshold, layer, mlp_k, head_k, TOL[dtype])
    # the predictors' first GEMV given (as the q + K/V launch computes it): the two last kernels
    hidden = hs.side_gemv_reference(hs.hidden_gemv(x, hs.stack_w1t(mlp[0], head[0]), layer, rm, rh))
    got = ps.predict_sets(x, mlp, head, threshold, layer=layer, mlp_k=mlp_k, head_k=head_k, impl="triton",
                          tuning=tuning, hidden=hidden)
    _check_sets(got, x, mlp, head, threshold, layer, mlp_k, head_k, TOL[dtype])


def test_equal_to_reference_exactly_when_scores_are_clear():
    """f32, a threshold in a gap of the scores: the sets and their order are the reference's
    bit for bit, capped and uncapped."""
    key = jax.random.key(7)
    L, d, r, f, h = 2, 384, 64, 700, 24
    mlp = random_predictor(key, L, d, r, f, jnp.float32)
    head = random_predictor(jax.random.fold_in(key, 1), L, d, r, h, jnp.float32)
    x = jax.random.normal(jax.random.fold_in(key, 2), (1, d))
    sm = np.sort(np.asarray(ps.scores_reference(x, *mlp, 1)[0]))
    gaps = np.diff(sm)
    i = int(np.argmax(gaps[len(sm) // 2:])) + len(sm) // 2  # the widest gap in the upper half
    threshold = float((sm[i] + sm[i + 1]) / 2)
    for mlp_k in (f, 50):
        got = ps.predict_sets(x, mlp, head, threshold, layer=1, mlp_k=mlp_k, head_k=5, impl="triton")
        want = ps.predict_sets_reference(x, mlp, head, threshold, layer=1, mlp_k=mlp_k, head_k=5)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert int(got[2]) == min(50, len(sm) - 1 - i)


def test_lowers_to_triton_for_hopper(monkeypatch):
    """At the OPT-13B and OPT-30B shapes, the three kernels lower to Triton IR for sm_90 (what
    the GPU compiles; on the CPU the lowering is asked for with a stand-in device record)."""
    pretend_hopper(monkeypatch)
    S = jax.ShapeDtypeStruct
    for d, r, f, h in ((5120, 256, 20480, 40), (7168, 512, 28672, 56)):
        bf = jnp.bfloat16
        mlp = (S((2, d, r), bf), S((2, r, f), bf), S((2, f), bf))
        head = (S((2, d, r), bf), S((2, r, h), bf), S((2, h), bf))
        fn = functools.partial(ps._predict_sets_triton, layer=1, mlp_k=f, head_k=h // 2,
                               tuning=ps.auto_tuning(d, r, f), interpret=False)
        text = jax.jit(fn).trace(S((1, d), bf), mlp, head, S((), jnp.float32), None).lower(
            lowering_platforms=("cuda",)).as_text()
        for name in ("dejavu_sets_hidden", "dejavu_sets_scores", "dejavu_sets_scatter"):
            assert name in text
        # with the hidden given (the q + K/V launch's): the scores and scatter kernels only
        text = jax.jit(fn).trace(S((1, d), bf), mlp, head, S((), jnp.float32), S((1, 2 * r), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "dejavu_sets_hidden" not in text and "dejavu_sets_scores" in text and "dejavu_sets_scatter" in text


def test_auto_tuning(monkeypatch):
    t = ps.auto_tuning(5120, 256, 20480)  # OPT-13B: 20 row splits, 64-neuron tiles
    assert (t.rows, t.cols, t.tile, t.warps) == (256, 32, 64, (8, 8, 4))
    assert ps.auto_tuning(7168, 512, 28672).tile == 64  # OPT-30B: 64 neurons at rank 512 too
    assert ps.auto_tuning(64, 8, 20).rows == 64 and ps.auto_tuning(64, 8, 20).tile == 32
    monkeypatch.setattr(ps, "SCORES_TILE", 128)  # the scores tile follows the switch
    assert ps.auto_tuning(7168, 512, 28672).tile == 128 and ps.auto_tuning(64, 8, 20).tile == 32
    monkeypatch.setattr(ps, "SCORES_WARPS", 4)
    assert ps.auto_tuning(7168, 512, 28672).warps == (8, 4, 4)
    monkeypatch.setattr(ps, "SCORES_WARPS", 6)
    with pytest.raises(ValueError, match="SCORES_WARPS is 6"):
        ps.auto_tuning(7168, 512, 28672)
    monkeypatch.setattr(ps, "SCORES_WARPS", 8)
    monkeypatch.setattr(ps, "SCORES_TILE", 96)
    with pytest.raises(ValueError, match="SCORES_TILE is 96"):
        ps.auto_tuning(7168, 512, 28672)


def test_bad_input():
    mlp = (jnp.zeros((2, 8, 4)), jnp.zeros((2, 4, 16)), jnp.zeros((2, 16)))
    head = (jnp.zeros((2, 8, 4)), jnp.zeros((2, 4, 6)), jnp.zeros((2, 6)))
    x = jnp.zeros((1, 8))
    call = functools.partial(ps.predict_sets, x, mlp, head, 0.0, layer=0, mlp_k=4, head_k=2)
    with pytest.raises(ValueError, match="batch 2"):
        ps.predict_sets(jnp.zeros((2, 8)), mlp, head, 0.0, layer=0, mlp_k=4, head_k=2)
    with pytest.raises(ValueError, match="another model"):
        ps.predict_sets(jnp.zeros((1, 9)), mlp, head, 0.0, layer=0, mlp_k=4, head_k=2)
    with pytest.raises(ValueError, match="layer must be"):
        call(layer=2)
    with pytest.raises(ValueError, match="mlp_k must be"):
        call(mlp_k=17)
    with pytest.raises(ValueError, match="head_k must be"):
        call(head_k=0)
    with pytest.raises(ValueError, match="impl"):
        call(impl="mosaic")
    with pytest.raises(ValueError, match="w2 must have shape"):
        ps.predict_sets(x, (mlp[0], jnp.zeros((2, 5, 16)), mlp[2]), head, 0.0, layer=0, mlp_k=4, head_k=2)
    with pytest.raises(ValueError, match="hidden must have shape"):
        call(hidden=jnp.zeros((1, 4)))  # rm + rh = 8 columns
    # auto on a CPU: the reference, no kernel in the program
    text = jax.jit(lambda x: call.func(x, mlp, head, 0.0, layer=0, mlp_k=4, head_k=2)).lower(x).as_text()
    assert "dejavu_sets" not in text


def test_decode_layer_sets_take_the_kernel():
    """`dejavu_jax.sparse.layer_sets` at batch 1 with a threshold: impl="triton" runs
    predict_sets and gives the XLA path's sets, for every layer of random predictors."""
    from dejavu_jax import sparse as S
    from dejavu_jax.config import preset
    from dejavu_jax.predictors.modules import random_predictors

    cfg = preset("opt-125m").replace(hidden_size=256, ffn_dim=1024, num_attention_heads=8, num_hidden_layers=3)
    pred = random_predictors(cfg, 64, dtype=jnp.float32, seed=3)
    x = jax.random.normal(jax.random.key(5), (1, 256))
    assert S.fused_sets("triton", 1) and not S.fused_sets("xla", 1) and not S.fused_sets("triton", 2)
    assert not S.fused_sets("auto", 1)  # CPU: the dispatch table's XLA
    mlp, head = (pred.mlp_w1, pred.mlp_w2, pred.mlp_b2), (pred.head_w1, pred.head_w2, pred.head_b2)
    for layer in range(3):
        kw = dict(head_k=3, mlp_k=512, block=128, threshold=0.5)
        (h1, _, _), (i1, c1, _) = S.layer_sets(pred, layer, x, impl="triton", **kw)
        (h2, _, _), (i2, c2, _) = S.layer_sets(pred, layer, x, impl="xla", **kw)
        _check_sets((h1, i1, c1), x, mlp, head, 0.5, layer, 512, 3, TOL["float32"])
        assert ps.sets_disagreement((h1, i1 + 1, c1), x, mlp, head, 0.5, layer=layer, mlp_k=512, head_k=3,
                                    tol=TOL["float32"])  # the check can fail
        assert abs(int(c1) - int(c2)) <= 1 and len(set(np.asarray(h1).tolist()) ^ set(np.asarray(h2).tolist())) <= 2
