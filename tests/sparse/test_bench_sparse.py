"""The sparse-decode benchmark's machinery on the CPU: CUPTI profile arithmetic, selection
ablations that really change the traced program, and one tiny measured job end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import sparse as S
from dejavu_jax.bench_profile import async_overlap, family, per_token
from dejavu_jax.bench_sparse import (SPARSE_STATICS, _jit_args, fresh_sparse_jit, measure_model, patched_fusion,
                                     patched_select,
                                     table, variant)
from dejavu_jax.config import preset
from dejavu_jax.model import random_model
from dejavu_jax.predictors.modules import random_predictors


def test_family_names():
    assert family("loop_add_fusion_3") == "loop_add_fusion"
    assert family("input_reduce_fusion.12") == "input_reduce_fusion"
    assert family("dejavu_gather_matvec") == "dejavu_gather_matvec"
    assert family("void cub::DeviceRadixSortOnesweepKernel<Policy>(int)") == "void cub::DeviceRadixSortOnesweepKernel"


def test_async_overlap_counts_kernels_between_start_and_done():
    hlo = """
%body (p: (s32[], bf16[1,64])) -> (s32[], bf16[1,64]) {
  %p = (s32[], bf16[1,64]{1,0}) parameter(0)
  %call-start = ((bf16[1,64]{1,0}), s32[8]{0}, s32[]) call-start(%gte.1), async_execution_thread="main", to_apply=%wrapped, frontend_attributes={_xla_stream_annotation="1"}
  %fusion.3 = bf16[1,64]{1,0} fusion(%gte.1), kind=kLoop, calls=%fused_add
  %custom-call.2 = bf16[1,64]{1,0} custom-call(%fusion.3, %w), custom_call_target="__gpu$xla.gpu.triton"
  %gte.9 = s32[] get-tuple-element(%p), index=0
  %call-done = s32[8]{0} call-done(%call-start)
  %call-start.1 = ((bf16[1,64]{1,0}), s32[8]{0}, s32[]) call-start(%custom-call.2), to_apply=%wrapped.1
  %call-done.1 = s32[8]{0} call-done(%call-start.1)
  %call-start.2 = ((bf16[1,64]{1,0}), s32[8]{0}, s32[]) call-start(%custom-call.2), to_apply=%wrapped.2
  ROOT %t = (s32[], bf16[1,64]{1,0}) tuple(%gte.9, %custom-call.2)
}
"""
    assert async_overlap(hlo) == [
        {"call": "call-start", "instructions_between": 3, "kernels_between": 2},
        {"call": "call-start.1", "instructions_between": 0, "kernels_between": 0},
        {"call": "call-start.2", "instructions_between": -1, "kernels_between": 0},
    ]


def test_per_token_subtracts_the_one_token_run():
    prof_1 = [("gemm_1", 1.0), ("sort", 0.5)]
    prof_n = prof_1 + [("gemm_2", 2.0), ("sort", 0.25), ("gemm_3", 2.0), ("sort", 0.25)]  # n = 3: 2 steps
    out = per_token(prof_n, prof_1, 3)
    assert out["kernels_per_token"] == 2.0
    assert out["kernel_ms_per_token"] == pytest.approx(2.25)
    assert out["families"]["gemm"] == {"ms": 2.0, "launches": 1.0}
    assert out["families"]["sort"]["ms"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def tiny():
    cfg = preset("opt-125m").replace(num_hidden_layers=2)
    model = random_model(cfg, jnp.float32)
    pred = random_predictors(cfg, 16, mlp_density=0.1, head_keep=0.5, dtype=jnp.float32)
    return cfg, model, pred


def test_random_predictors_keep_the_dtype(tiny):
    cfg, _, _ = tiny
    pred = random_predictors(cfg, 16, dtype=jnp.bfloat16)
    assert pred.mlp_w2.dtype == jnp.bfloat16 and pred.head_w1.dtype == jnp.bfloat16
    assert pred.mlp_b2.dtype == jnp.float32
    assert float(jnp.std(pred.mlp_w1.astype(jnp.float32))) > 0


@pytest.mark.parametrize("kind,has_top_k", [("top_k", True), ("fixed", False), ("argmax", False)])
def test_selection_ablation_retraces(tiny, kind, has_top_k):
    cfg, model, pred = tiny
    sp = S.SparsityConfig(mlp_density=0.1, head_keep=0.5)
    args, kw = _jit_args(model, np.ones((1, 16), np.int32), 4, dict(sparsity=sp, budgets=sp.layer_budgets(cfg, pred)))
    # trace the real one first, so a shared trace cache would hand it back to the ablation
    fresh_sparse_jit().lower(model, pred, *args, **kw)
    with patched_select(kind):
        text = fresh_sparse_jit().lower(model, pred, *args, **kw).as_text()
    assert ("top_k" in text) == has_top_k
    assert S.select.__module__ == "dejavu_jax.sparse"  # restored
    assert set(SPARSE_STATICS) >= {"sparsity", "budgets"}


def test_glue_ablation_retraces(tiny):
    """glue="unfused" traces the step without the fused boundary kernels (add_layer_norm, q + K/V
    into the cache); the default (an explicit kernel impl here, on a CPU) has both."""
    cfg, model, pred = tiny
    sp = S.SparsityConfig(mlp_density=0.1, head_keep=0.5, impl="triton")
    args, kw = _jit_args(model, np.ones((1, 8), np.int32), 3, dict(sparsity=sp, budgets=sp.layer_budgets(cfg, pred)))
    fused = fresh_sparse_jit().lower(model, pred, *args, **kw).as_text()
    with patched_fusion("glue", "unfused"):
        unfused = fresh_sparse_jit().lower(model, pred, *args, **kw).as_text()
    assert "add_layer_norm" in fused and "q_kv_cache" in fused
    assert "add_layer_norm" not in unfused and "q_kv_cache" not in unfused
    assert S.fused_glue.__module__ == "dejavu_jax.sparse"  # restored
    with pytest.raises(ValueError, match="unknown fusion"):
        with patched_fusion("mlp", "unfused"):
            pass


def test_measure_model_tiny_job(capsys):
    spec = dict(model="opt-125m", layers=1, batches=[1], prompt_len=8, new_tokens=3, reps=1, profile=True,
                settings=[dict(mlp_density=0.1, head_keep=0.5),
                          dict(mlp_density=0.1, head_keep=0.5, selection="fixed"),
                          dict(mlp_density=2.0, head_keep=0.5),
                          dict(mlp_density=0.1, head_keep=0.5, selection="threshold")])
    measure_model(spec)
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in recs] == ["dense", "sparse", "sparse", "sparse", "sparse"]
    thr = recs[4]  # a threshold calibrated to ~10%, no cap: the density it used is recorded
    assert variant(thr) == "sel=threshold" and thr["mlp_cap_density"] == 1.0 and "mlp_threshold" in thr
    assert 0.02 < thr["used_mlp_density"] < 0.3
    # timings are recorded (their size on a busy CPU is noise: no timing assertion)
    assert all(isinstance(r["ms_per_token"], float) for r in recs[:3]) and "profile_error" in recs[0]  # no CUPTI
    assert recs[1]["used_mlp_density"] == pytest.approx(384 / 3072)  # 10% rounded up to 128-blocks
    assert "speedup_vs_dense" in recs[1]
    assert variant(recs[2]) == "sel=fixed"
    assert "mlp_density" in recs[3]["error"]  # a bad setting is recorded, the job goes on
    assert "error" in table(recs)
