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


def test_select_with_the_kernel_gives_the_same_sets(monkeypatch):
    """Where the dispatch table picks the Pallas selection kernel (interpret mode here), the MLP
    sets and the batch union equal the sort's."""
    from pallas_kernels import dispatch

    rng = np.random.default_rng(3)
    scores = jnp.asarray(rng.normal(size=(3, S.SMALL_TOP_K * 2 + 5)), jnp.float32)
    want = [S.select(scores[:1], 40, 8), S.select(scores, 40, 8)]
    real = dispatch.backend_for
    monkeypatch.setattr(dispatch, "backend_for",
                        lambda op, device=None, *, batch=1: "triton" if op == "top_k_select" else real(op, device, batch=batch))
    assert S._select_kernel("auto", 1) and not S._select_kernel("xla", 1)
    got = [S.select(scores[:1], 40, 8), S.select(scores, 40, 8)]
    assert set(np.asarray(got[0][0]).tolist()) == set(np.asarray(want[0][0]).tolist())
    (gi, gc, gm), (wi, wc, wm) = got[1], want[1]
    assert int(gc) == int(wc)
    members = lambda i, m, c: [{int(j) for j, x in zip(i[:c], row[:c]) if x} for row in np.asarray(m)]  # noqa: E731
    assert members(np.asarray(gi), gm, int(gc)) == members(np.asarray(wi), wm, int(wc))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 600), data=st.data(), levels=st.sampled_from([3, 1000]))
def test_threshold_at_batch_1_is_a_compaction(n, data, levels):
    """Batch 1 with a threshold: no sort; the set is every score above it, ascending, count =
    min(#above, k); past the cap, the k lowest-indexed. Where the cap does not bind it is the
    sort-based set (top_k, then the threshold)."""
    k = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scores = jnp.asarray(rng.integers(-levels, levels, (1, n)) / levels, jnp.float32)
    t = float(data.draw(st.sampled_from([-0.5, 0.0, 0.5])))
    idx, count, mask = S.select(scores, k, 1, threshold=t)
    above = np.flatnonzero(np.asarray(scores[0]) > t)
    assert mask is None and idx.shape == (k,) and idx.dtype == jnp.int32
    assert int(count) == min(len(above), k)
    np.testing.assert_array_equal(np.asarray(idx)[:int(count)], above[:k])
    text = jax.jit(lambda s: S.select(s, k, 1, threshold=t)).lower(scores).as_text()
    assert "stablehlo.sort" not in text and "top_k" not in text
    if len(above) <= k:
        top_vals, top_idx = jax.lax.top_k(scores, k)
        want = np.asarray(top_idx[0])[np.asarray(top_vals[0]) > t]
        assert set(np.asarray(idx)[:int(count)].tolist()) == set(want.tolist())


def test_threshold_without_a_cap_in_a_batch_needs_no_ranking():
    """B > 1, k = n: each row's set is its scores above the threshold (no top_k traced), the
    same sets the ranked path gives."""
    rng = np.random.default_rng(4)
    scores = jnp.asarray(rng.normal(size=(3, 300)), jnp.float32)
    idx, count, rows = S.select(scores, 300, 8, threshold=0.5)
    assert "top_k" not in jax.jit(lambda s: S.select(s, 300, 8, threshold=0.5)).lower(scores).as_text()
    above = np.asarray(scores) > 0.5
    assert int(count) == above.any(0).sum()
    idx, rows = np.asarray(idx), np.asarray(rows)
    for r in range(3):
        assert {int(i) for i, m in zip(idx, rows[r]) if m} == set(np.flatnonzero(above[r]).tolist())
    # with a cap the rows are ranked first, and below the cap the sets are the same
    idx2, count2, rows2 = S.select(scores, 299, 8, threshold=0.5)
    assert int(count2) == int(count)
    assert [{int(i) for i, m in zip(np.asarray(idx2), row) if m} for row in np.asarray(rows2)] == \
        [set(np.flatnonzero(a).tolist()) for a in above]
