"""sparse_decode: exactness at full density, oracle sets, set selection, and config errors."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dejavu_jax as dj
from dejavu_jax import model as M
from dejavu_jax import sparse as S
from dejavu_jax.bench_sparse import _jit_args
from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import ConfigError
from dejavu_jax.predictors.modules import random_predictors
from dejavu_jax.sparse import SparsityConfig, select, sparse_decode, sparse_decode_fn
from pallas_kernels.sparse_mlp import sparse_mlp

CFG = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    return M.random_model(CFG, jnp.float32, std=0.3, seed=1)


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (2, 6))
    mask = np.ones((2, 6), np.int32)
    mask[1, :2] = 0
    return tokens, mask


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
@pytest.mark.parametrize("batch_mode", ["union", "per_row"])
@pytest.mark.parametrize("lookahead", [True, False])
def test_full_density_equals_dense_decode(model, prompt, kv_policy, batch_mode, lookahead):
    """Density 1.0 and every head still runs the sparse kernels (on a permutation of all
    neurons and heads), so this checks the whole sparse path against dense_decode."""
    tokens, mask = prompt
    pred = random_predictors(CFG, 8, block_size=8, lookahead=lookahead, dtype=jnp.float32)
    dense = np.asarray(dj.dense_decode(model, tokens, 10, attention_mask=mask))
    sp = SparsityConfig(mlp_density=1.0, head_keep=1.0, kv_policy=kv_policy, batch_mode=batch_mode,
                        lookahead=lookahead)
    for rows in (slice(0, 1), slice(0, 2)):
        out = np.asarray(sparse_decode(model, pred, tokens[rows], 10, attention_mask=mask[rows], sparsity=sp))
        np.testing.assert_array_equal(out, dense[rows])


def test_full_density_with_pallas_kernels_interpreted(model, prompt):
    """The same exactness with the Triton-lowered Pallas kernels (interpret mode on CPU)."""
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    dense = np.asarray(dj.dense_decode(model, tokens[:1], 4))
    sp = SparsityConfig(mlp_density=1.0, head_keep=1.0, impl="triton")
    np.testing.assert_array_equal(np.asarray(sparse_decode(model, pred, tokens[:1], 4, sparsity=sp)), dense)


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
def test_fused_glue_gives_the_unfused_tokens(model, prompt, monkeypatch, kv_policy):
    """At real sparsity (f32, kernels interpreted), the fused layer boundaries (add_layer_norm,
    with "all" also q + K/V into the cache) give the same tokens and densities as the XLA ops
    they replace."""
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    sp = SparsityConfig(mlp_density=0.5, head_keep=0.5, impl="triton", kv_policy=kv_policy)
    assert S.fused_glue("triton", 1) and not S.fused_glue("xla", 1) and not S.fused_glue("auto", 1)  # CPU
    fused = sparse_decode(model, pred, tokens[:1], 5, sparsity=sp, return_stats=True)
    jax.clear_caches()
    monkeypatch.setattr(S, "fused_glue", lambda impl, batch: False)
    unfused = sparse_decode(model, pred, tokens[:1], 5, sparsity=sp, return_stats=True)
    np.testing.assert_array_equal(np.asarray(fused[0]), np.asarray(unfused[0]))
    np.testing.assert_array_equal(np.asarray(fused[1]["mlp_density"]), np.asarray(unfused[1]["mlp_density"]))
    jax.clear_caches()


def pallas_calls(jaxpr) -> list[str]:
    """Names of the Pallas calls in a jaxpr (Mosaic GPU kernels are `mpmd_map`s), sub-jaxprs
    (jit, loops, branches) included."""
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pallas_call", "mpmd_map"):
            names.append(eqn.params["name"])
            continue
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    names += pallas_calls(sub)
    return names


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
def test_sets_finished_in_the_q_kv_launch_give_the_same_tokens(model, prompt, monkeypatch, kv_policy):
    """Batch 1 with a threshold (kernels interpreted): layer l+1's predictor hidden from layer
    l's q + K/V launch (`fused_hidden`), its scores from layer l's attention launch
    (`fused_scores`, the default; or its out-projection launch) and each layer's MLP set
    scattered in its own q + K/V launch (`fused_scatter`) give the tokens and densities of
    `predict_sets`' own kernels. The lowered step holds hidden and scores kernels only where
    no sparse layer's launches can host them (layer 0's sets, and those after the dense
    layer 1), and no scatter kernel."""
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    assert S.SCORES_IN_ATTENTION and not S.SCORES_IN_OUT_PROJECTION  # the attention's launch by default
    for fn in (S.fused_hidden, S.fused_scatter, S.fused_scores):
        assert fn("triton", 1) and not fn("triton", 2) and not fn("auto", 1)  # CPU: auto is XLA

    def run(dense_layers):
        sp = SparsityConfig(mlp_density=1.0, mlp_threshold=0.0, head_keep=0.5, impl="triton", kv_policy=kv_policy,
                            dense_layers=dense_layers)
        out = sparse_decode(model, pred, tokens[:1], 5, sparsity=sp, return_stats=True)
        args, kw = _jit_args(model, tokens[:1], 3, dict(sparsity=sp, budgets=sp.layer_budgets(CFG, pred)))
        calls = pallas_calls(S._sparse_decode_jit.trace(model, pred, *args, **kw).jaxpr.jaxpr)
        return out, [calls.count(f"dejavu_{k}") for k in ("sets_hidden", "sets_scores", "sets_scatter", "q_kv_cache")]

    fused, fused_dense1 = run(()), run((1,))
    jax.clear_caches()
    with monkeypatch.context() as m:  # the scores in the out-projection's launch (off: measured slower),
        m.setattr(S, "SCORES_IN_ATTENTION", False)  # the MLP set scattered by its own kernel
        m.setattr(S, "SCORES_IN_OUT_PROJECTION", True)
        m.setattr(S, "fused_scatter", lambda impl, batch: False)
        assert S.fused_scores("triton", 1)
        own_scatter = run(())
    for i in (0, 1):  # tokens, then the stats
        got, want = own_scatter[0][i], fused[0][i]
        np.testing.assert_array_equal(np.asarray(got if i == 0 else got["mlp_density"]),
                                      np.asarray(want if i == 0 else want["mlp_density"]))
    assert own_scatter[1] == [1, 1, 3, 3]
    jax.clear_caches()
    monkeypatch.setattr(S, "fused_hidden", lambda impl, batch: False)
    monkeypatch.setattr(S, "fused_scatter", lambda impl, batch: False)
    monkeypatch.setattr(S, "fused_scores", lambda impl, batch: False)
    unfused, unfused_dense1 = run(()), run((1,))
    jax.clear_caches()
    for a, b in ((fused, unfused), (fused_dense1, unfused_dense1)):
        np.testing.assert_array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
        np.testing.assert_array_equal(np.asarray(a[0][1]["mlp_density"]), np.asarray(b[0][1]["mlp_density"]))
    assert 0 < float(np.mean(fused[0][1]["mlp_density"])) < 1  # the threshold really selects
    # [hidden, scores, scatter, q + K/V] kernels in the step; layer 2's sets after the dense
    # layer 1 come from layer 1's input, with no sparse launches there to host them
    assert (fused[1], unfused[1]) == ([1, 1, 0, 3], [3, 3, 3, 3])
    assert (fused_dense1[1], unfused_dense1[1]) == ([2, 2, 0, 2], [2, 2, 2, 2])


def _decode_counting(model, pred, tokens, kv_policy, dense_layers, names):
    """Batch-1 decode at 50% / half the heads, kernels interpreted: ((tokens, stats), then the
    count of each Pallas call in ``names`` in the lowered decode)."""
    sp = SparsityConfig(mlp_density=0.5, head_keep=0.5, impl="triton", kv_policy=kv_policy, dense_layers=dense_layers)
    out = sparse_decode(model, pred, tokens[:1], 5, sparsity=sp, return_stats=True)
    args, kw = _jit_args(model, tokens[:1], 3, dict(sparsity=sp, budgets=sp.layer_budgets(CFG, pred)))
    calls = pallas_calls(S._sparse_decode_jit.trace(model, pred, *args, **kw).jaxpr.jaxpr)
    return (out, *(calls.count(n) for n in names))


@pytest.mark.parametrize("kv_policy", ["all", "selected"])
def test_sums_added_in_kernel_give_the_same_tokens(model, prompt, monkeypatch, kv_policy):
    """Batch 1, fused boundaries (kernels interpreted): the out-projection and the MLP add their
    f32 sums into buffers that the boundary kernels read and zero (`fused_out_sum`,
    `fused_mlp_sum` with 3 copies) and give the tokens and densities of the written-and-summed
    partials. The
    step holds one atomic out-projection a sparse layer and no other; a dense layer keeps its
    own path and hands the buffer on."""
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    # off by default (measured slower or no faster), on here, the MLP's in 3 copies
    assert not S.fused_mlp_sum("triton", 1) and not S.fused_out_sum("triton", 1)
    monkeypatch.setattr(S, "MLP_SUM_COPIES", 3)
    monkeypatch.setattr(S, "OUT_SUM_IN_KERNEL", True)
    for fn in (S.fused_mlp_sum, S.fused_out_sum):
        assert fn("triton", 1) and not fn("triton", 2) and not fn("auto", 1)  # CPU: auto is XLA

    def run(dense_layers=()):
        return _decode_counting(model, pred, tokens, kv_policy, dense_layers,
                                ("dejavu_gather_matvec_t_acc", "dejavu_gather_matvec_t"))

    summed, summed_dense1 = run(), run((1,))
    assert summed[1] == 3 and summed_dense1[1] == 2
    jax.clear_caches()
    monkeypatch.setattr(S, "fused_mlp_sum", lambda impl, batch: False)
    monkeypatch.setattr(S, "fused_out_sum", lambda impl, batch: False)
    parts, parts_dense1 = run(), run((1,))  # the same launches, each out-projection writing partials
    assert (parts[1:], parts_dense1[1:]) == ((0, summed[2] + 3), (0, summed_dense1[2] + 2))
    jax.clear_caches()
    for a, b in ((summed, parts), (summed_dense1, parts_dense1)):
        np.testing.assert_array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
        np.testing.assert_array_equal(np.asarray(a[0][1]["mlp_density"]), np.asarray(b[0][1]["mlp_density"]))


def test_partials_summed_by_the_boundary_kernels_give_the_same_tokens(model, prompt, monkeypatch):
    """Batch 1, fused boundaries (kernels interpreted): the out-projection and the MLP hand their
    partials to the boundary kernels (`boundary_sums`; off by default, measured no faster; on
    here), which sum them, and give the tokens and densities of the XLA-summed partials. The step holds one split boundary
    kernel per sparse boundary with a LayerNorm after it (the last MLP's feeds the LM head's
    LayerNorm, in XLA), and a dense layer keeps its own. (kv_policy "selected" changes only the
    q + K/V launch, not the boundaries; the GPU check runs both.)"""
    tokens, _ = prompt
    kv_policy = "all"
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    assert not S.boundary_sums("triton", 1)
    monkeypatch.setattr(S, "SUMS_IN_BOUNDARY", ("out", "mlp"))
    assert S.boundary_sums("triton", 1) and not S.boundary_sums("triton", 2) and not S.boundary_sums("auto", 1)

    def run(dense_layers=()):
        return _decode_counting(model, pred, tokens, kv_policy, dense_layers,
                                ("dejavu_add_layer_norm_split", "dejavu_add_layer_norm"))

    split, split_dense1 = run(), run((1,))
    # 3 layers: 3 attention boundaries + 2 MLP boundaries; layer 1 dense: 2 + 1
    assert split[1:] == (5, 0) and split_dense1[1:] == (3, 2)
    jax.clear_caches()
    monkeypatch.setattr(S, "SUMS_IN_BOUNDARY", ("out",))  # the out-projection's partials only
    out_only = run()
    assert out_only[1:] == (3, 2)
    np.testing.assert_array_equal(np.asarray(out_only[0][0]), np.asarray(split[0][0]))
    jax.clear_caches()
    monkeypatch.setattr(S, "SUMS_IN_BOUNDARY", ())
    summed, summed_dense1 = run(), run((1,))
    assert summed[1:] == (0, 5) and summed_dense1[1:] == (0, 5)
    jax.clear_caches()
    for a, b in ((split, summed), (split_dense1, summed_dense1)):
        np.testing.assert_array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
        np.testing.assert_array_equal(np.asarray(a[0][1]["mlp_density"]), np.asarray(b[0][1]["mlp_density"]))


def test_threshold_below_every_score_equals_dense_decode(model, prompt):
    """Batch 1 with a threshold selects by compaction; one below every score keeps all neurons
    (count = F) and gives dense_decode's tokens; the densities used are reported."""
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    dense = np.asarray(dj.dense_decode(model, tokens[:1], 6))
    sp = SparsityConfig(mlp_density=1.0, mlp_threshold=-1e30, head_keep=1.0)
    out, stats = sparse_decode(model, pred, tokens[:1], 6, sparsity=sp, return_stats=True)
    np.testing.assert_array_equal(np.asarray(out), dense)
    np.testing.assert_allclose(np.asarray(stats["mlp_density"]), 1.0)
    # a threshold above every score keeps none: the MLPs add only their output bias
    _, stats = sparse_decode(model, pred, tokens[:1], 3, sparsity=dataclasses.replace(sp, mlp_threshold=1e30),
                             return_stats=True)
    np.testing.assert_allclose(np.asarray(stats["mlp_density"]), 0.0)


@pytest.mark.parametrize("rows", [1, 2])
def test_predictor_stream_gives_the_same_tokens_and_sets(model, prompt, rows):
    """Sets from the second stream (compute_on) are the same computation: same tokens and the
    same densities used, at real sparsity (B = 2: union sets and their counts cross over)."""
    tokens, mask = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    outs = []
    for stream in (False, True):
        sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, dense_layers=(1,), predictor_stream=stream)
        outs.append(sparse_decode(model, pred, tokens[:rows], 8, attention_mask=mask[:rows], sparsity=sp,
                                  return_stats=True))
    (t0, s0), (t1, s1) = outs
    np.testing.assert_array_equal(np.asarray(t1), np.asarray(t0))
    for key in ("mlp_density", "head_density"):
        np.testing.assert_array_equal(np.asarray(s1[key]), np.asarray(s0[key]))


def test_predictor_stream_is_in_the_lowered_step(model):
    """At batch 1 each sparse layer's lookahead sets are one call annotated for stream 1 (what
    XLA:GPU runs on a second stream), with no call nested inside it (XLA's runtime rejects an
    async call inside a streamed one); without the option, or at B > 1, there is none."""
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)

    def lowered(stream, rows):
        sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, dense_layers=(1,), predictor_stream=stream)
        args, kw = _jit_args(model, np.tile([[2, 5, 7]], (rows, 1)), 3,
                             dict(sparsity=sp, budgets=sp.layer_budgets(CFG, pred)))
        return S._sparse_decode_jit.lower(model, pred, *args, **kw).as_text()

    text = lowered(True, 1)
    bodies = re.findall(r"func.func private @compute_on\w*\(.*?\n  }", text, re.S)
    assert len(bodies) == 2  # layers 0 and 2 (layer 1 is dense)
    assert all(re.search(r"\bcall @", b) is None for b in bodies)
    assert "_xla_stream_annotation" not in lowered(False, 1)
    assert "_xla_stream_annotation" not in lowered(True, 2)


def test_oracle_neurons_give_dense_mlp(model):
    """Keeping exactly the truly active neurons reproduces the dense MLP output."""
    lp = model.params["layers"][1]["mlp"]
    h = jax.random.normal(jax.random.key(3), (1, CFG.hidden_size))
    pre = h @ lp["fc1"].T + lp["b1"]
    active = int((pre > 0).sum())
    idx, count, _ = select(pre, active, block=1)
    assert count is None and set(np.asarray(idx).tolist()) == set(np.flatnonzero(np.asarray(pre[0]) > 0).tolist())
    out = sparse_mlp(h, lp["fc1"], lp["b1"], lp["fc2_t"], lp["b2"], idx, impl="xla")
    np.testing.assert_allclose(out, M.mlp(lp, h[:, None])[:, 0], rtol=1e-5, atol=1e-5)


def test_select_union_and_row_masks():
    scores = jnp.array([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0],
                        [0.0, 3.0, 0.0, 0.0, 0.0, 9.0]])
    idx, count, row_mask = select(scores, 2, block=2)
    idx, row_mask = np.asarray(idx), np.asarray(row_mask)
    assert int(count) == 3 and idx.shape == (4,)
    assert set(idx[:3].tolist()) == {0, 1, 5}
    assert {int(i) for i, m in zip(idx, row_mask[0]) if m} == {0, 1}
    assert {int(i) for i, m in zip(idx, row_mask[1]) if m} == {1, 5}
    assert not row_mask[:, 3:].any()
    # a threshold keeps only the confident ones, first in the list
    idx1, count1, _ = select(scores[:1], 3, block=1, threshold=1.0)
    assert int(count1) == 2 and set(np.asarray(idx1)[:2].tolist()) == {0, 1}


def test_stats_report_densities(model, prompt):
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, dense_layers=(2,))
    out, stats = sparse_decode(model, pred, tokens[:1], 6, sparsity=sp, return_stats=True)
    mlp, heads = np.asarray(stats["mlp_density"]), np.asarray(stats["head_density"])
    assert mlp.shape == (5, 3) and heads.shape == (5, 3)
    np.testing.assert_allclose(mlp[:, :2], 0.25)
    np.testing.assert_allclose(heads[:, :2], 0.5)
    np.testing.assert_allclose(mlp[:, 2], 1.0)
    assert out.shape == (1, 12)


def test_union_density_grows_with_batch(model):
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, CFG.vocab_size, (4, 5))
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    sp = SparsityConfig(mlp_density=0.125)
    _, s1 = sparse_decode(model, pred, tokens[:1], 4, sparsity=sp, return_stats=True)
    _, s4 = sparse_decode(model, pred, tokens, 4, sparsity=sp, return_stats=True)
    assert float(np.mean(s4["mlp_density"])) > float(np.mean(s1["mlp_density"]))


def test_generate_with_sparse_decode_fn(model, prompt):
    tokens, _ = prompt
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    fn = sparse_decode_fn(pred, SparsityConfig(mlp_density=1.0, head_keep=1.0))
    np.testing.assert_array_equal(np.asarray(fn(model, tokens[:1], 5)),
                                  np.asarray(dj.dense_decode(model, tokens[:1], 5)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_density=0.0), "mlp_density must lie in"),
    (dict(mlp_density=1.5), "mlp_density must lie in"),
    (dict(head_keep=1.2), "head_keep must lie in"),
    (dict(head_keep=0.1), "keeps no head"),
    (dict(dense_layers=(7,)), "outside the model's layers"),
    (dict(lookahead=False), "lookahead"),
    (dict(kv_policy="recompute"), "kv_policy"),
    (dict(batch_mode="each"), "batch_mode"),
    (dict(lookahead=False, predictor_stream=True), "predictor_stream=True needs lookahead"),
])
def test_bad_sparsity_config(model, kwargs, match):
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    with pytest.raises(ConfigError, match=match):
        sparse_decode(model, pred, np.array([[2, 5]]), 3, sparsity=SparsityConfig(**kwargs))


def test_predictors_for_another_model_are_refused(model):
    other = CFG.replace(num_hidden_layers=2)
    pred = random_predictors(other, 8, block_size=8, dtype=jnp.float32)
    with pytest.raises(ConfigError, match="predictors are for a model"):
        sparse_decode(model, pred, np.array([[2, 5]]), 3)
    same_shape = CFG.replace(max_position_embeddings=32)
    pred = random_predictors(same_shape, 8, block_size=8, dtype=jnp.float32)
    with pytest.raises(ConfigError, match="fingerprint"):
        sparse_decode(model, pred, np.array([[2, 5]]), 3)


WIDE = OPTConfig(vocab_size=64, hidden_size=512, num_hidden_layers=3, ffn_dim=1024, num_attention_heads=4,
                 max_position_embeddings=32)


def decode_with_calls(model, pred, tokens, sp):
    """(sparse_decode's 3 tokens and stats, the names of the Pallas calls its jitted loop makes,
    that loop's jaxpr as text) on the WIDE model."""
    out = sparse_decode(model, pred, tokens, 3, sparsity=sp, return_stats=True)
    args, kw = _jit_args(model, tokens, 3, dict(sparsity=sp, budgets=sp.layer_budgets(WIDE, pred)))
    jaxpr = S._sparse_decode_jit.trace(model, pred, *args, **kw).jaxpr.jaxpr
    return out, pallas_calls(jaxpr), str(jaxpr)


def assert_same_decodes(*pairs):
    """Each pair of `decode_with_calls`-style results: the same tokens and MLP densities."""
    for a, b in pairs:
        np.testing.assert_array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
        np.testing.assert_array_equal(np.asarray(a[0][1]["mlp_density"]), np.asarray(b[0][1]["mlp_density"]))


def test_mosaic_mlp_boundary_gives_the_same_tokens(monkeypatch):
    """Batch 1, fused boundaries (kernels interpreted), a width the Mosaic kernels take: the
    boundary before each sparse MLP as the Mosaic kernel (`mosaic_mlp_boundary`, with `PDL` on
    for it and the MLP; off by default, measured no faster) gives the tokens and densities of
    the Triton boundary. One Mosaic boundary a sparse layer; a dense layer keeps the Triton one;
    the next layer's sets (lookahead) go before it through an optimization barrier."""
    from pallas_kernels import _mosaic_mlp as mm
    from pallas_kernels import layer_norm as ln

    model = M.random_model(WIDE, jnp.float32, std=0.3, seed=2)
    pred = random_predictors(WIDE, 16, block_size=8, dtype=jnp.float32)
    tokens = np.random.default_rng(1).integers(3, WIDE.vocab_size, (1, 5))
    assert not S.mosaic_mlp_boundary("triton", 1)

    def run(dense_layers=()):
        sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, impl="triton", dense_layers=dense_layers)
        out, calls, jaxpr = decode_with_calls(model, pred, tokens, sp)
        return out, calls.count("dejavu_add_layer_norm_mosaic"), calls.count("dejavu_add_layer_norm"), jaxpr

    triton, triton_dense1 = run(), run((1,))
    jax.clear_caches()
    monkeypatch.setattr(S, "MOSAIC_MLP_BOUNDARY", True)
    monkeypatch.setattr(ln, "PDL", True)
    monkeypatch.setattr(mm, "PDL", True)
    assert S.mosaic_mlp_boundary("triton", 1) and not S.mosaic_mlp_boundary("triton", 2)
    assert not S.mosaic_mlp_boundary("auto", 1)  # CPU: auto is XLA
    mosaic, mosaic_dense1 = run(), run((1,))
    jax.clear_caches()
    # 3 layers: 3 MLP boundaries + 2 attention boundaries (the last MLP's LayerNorm is the LM head's)
    assert triton[1:3] == (0, 5) and mosaic[1:3] == (3, 2) and mosaic_dense1[1:3] == (2, 3)
    assert "optimization_barrier" in mosaic[3] and "optimization_barrier" not in triton[3]
    assert_same_decodes((mosaic, triton), (mosaic_dense1, triton_dense1))


def test_boundary_in_mlp_gives_the_same_tokens(monkeypatch):
    """Batch 1, fused boundaries, the Mosaic MLP (impl "mosaic"; kernels interpreted): the
    boundary before each sparse MLP computed in the MLP's kernel (`boundary_in_mlp`, on by
    default) gives the tokens and densities of the boundary kernel before the MLP. One fused
    kernel a sparse layer and no boundary kernel before it; a dense layer keeps its boundary."""
    model = M.random_model(WIDE, jnp.float32, std=0.3, seed=3)
    pred = random_predictors(WIDE, 16, block_size=8, dtype=jnp.float32)
    tokens = np.random.default_rng(2).integers(3, WIDE.vocab_size, (1, 5))
    assert S.BOUNDARY_IN_MLP and S.boundary_in_mlp("mosaic", 1)  # the default
    monkeypatch.setattr(S, "BOUNDARY_IN_MLP", False)
    assert not S.boundary_in_mlp("mosaic", 1)

    def run(dense_layers=()):
        sp = SparsityConfig(mlp_density=0.25, head_keep=0.5, impl="mosaic", dense_layers=dense_layers)
        out, calls, _ = decode_with_calls(model, pred, tokens, sp)
        boundaries = sum(calls.count(n) for n in ("dejavu_add_layer_norm", "dejavu_add_layer_norm_mosaic"))
        return out, calls.count("dejavu_boundary_mlp"), boundaries

    apart, apart_dense1 = run(), run((1,))
    jax.clear_caches()
    monkeypatch.setattr(S, "BOUNDARY_IN_MLP", True)
    assert S.boundary_in_mlp("mosaic", 1) and not S.boundary_in_mlp("mosaic", 2)
    assert not S.boundary_in_mlp("triton", 1) and not S.boundary_in_mlp("auto", 1)  # CPU: auto is XLA
    fused, fused_dense1 = run(), run((1,))
    jax.clear_caches()
    # 3 layers: 3 MLP boundaries + 2 attention boundaries (the last MLP's LayerNorm is the LM head's)
    assert apart[1:] == (0, 5) and fused[1:] == (3, 2) and fused_dense1[1:] == (2, 3)
    assert_same_decodes((fused, apart), (fused_dense1, apart_dense1))
