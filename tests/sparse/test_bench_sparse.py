"""The sparse-decode benchmark's machinery on the CPU: CUPTI profile arithmetic, selection
ablations that really change the traced program, and one tiny measured job end to end."""

import json

import jax
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
    assert S.select.__module__ == "dejavu_jax.sparse_select"  # restored (the real one, re-exported)
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
    from pallas_kernels import predict_sets as ps

    tile = "pallas_kernels.predict_sets.SCORES_TILE"
    spec = dict(model="opt-125m", layers=1, batches=[1], prompt_len=8, new_tokens=3, reps=1, profile=True,
                settings=[dict(mlp_density=0.1, head_keep=0.5),
                          dict(mlp_density=0.1, head_keep=0.5, selection="fixed"),
                          dict(mlp_density=2.0, head_keep=0.5),
                          dict(mlp_density=0.1, head_keep=0.5, selection="threshold"),
                          dict(mlp_density=0.1, head_keep=0.5, constants={tile: 16}),
                          dict(mlp_density=0.1, head_keep=0.5, constants={"pallas_kernels.predict_sets.NO_SUCH": 1})])
    measure_model(spec)
    assert ps.SCORES_TILE == 64  # a setting's constants hold for that setting only
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in recs] == ["dense"] + ["sparse"] * 6
    assert recs[5]["constants"] == {tile: 16} and "ms_per_token" in recs[5]
    assert variant(recs[5]) == "SCORES_TILE=16"
    assert "has no NO_SUCH" in recs[6]["error"]  # a misspelt one is recorded by name, the job goes on
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


def test_job_constants_are_set_recorded_and_checked():
    """A job's ``constants`` set module switches in its process, show in the record's variant,
    and a misspelt one fails by name; `constants_set` sets them for a with-block only."""
    from dejavu_jax.bench_sparse import constants_set, set_constants
    from pallas_kernels import _triton_q_kv as tq

    old = tq.EXTRA_PROGRAMS_FIRST
    try:
        set_constants({"pallas_kernels._triton_q_kv.EXTRA_PROGRAMS_FIRST": not old})
        assert tq.EXTRA_PROGRAMS_FIRST is (not old)
    finally:
        tq.EXTRA_PROGRAMS_FIRST = old
    with pytest.raises(ValueError, match="has no EXTRA_FIRST"):
        set_constants({"pallas_kernels._triton_q_kv.EXTRA_FIRST": True})
    with constants_set({"pallas_kernels._triton_q_kv.EXTRA_PROGRAMS_FIRST": not old}):  # set for the block only
        assert tq.EXTRA_PROGRAMS_FIRST is (not old)
    assert tq.EXTRA_PROGRAMS_FIRST is old
    with pytest.raises(ValueError, match="unknown constant"):
        with constants_set({"pallas_kernels._triton_q_kv.EXTRA_FIRST": True}):
            pass
    # a switch read inside a jitted function takes effect in the block and is undone after it
    from pallas_kernels import decode_attention as da

    splits = jax.jit(lambda x: x + da.MAX_SEQ_SPLITS)
    before = int(splits(0))
    with constants_set({"pallas_kernels.decode_attention.MAX_SEQ_SPLITS": before + 3}):
        assert int(splits(0)) == before + 3
    assert int(splits(0)) == before
    rec = dict(impl="sparse", selection="threshold", constants={"pallas_kernels._triton_q_kv.EXTRA_PROGRAMS_FIRST": True})
    assert variant(rec) == "sel=threshold,EXTRA_PROGRAMS_FIRST=True"
    # two modules' switches of one name are told apart by their module
    rec["constants"] = {"pallas_kernels.layer_norm.PDL": True, "pallas_kernels._mosaic_mlp.PDL": False}
    assert variant(rec) == "sel=threshold,layer_norm.PDL=True,_mosaic_mlp.PDL=False"


def _rec(model, batch, impl, dens, keep, ms, dense_ms, commit, **kw):
    return dict(model=model, batch=batch, impl=impl, mlp_density=dens, head_keep=keep, ms_per_token=ms,
                speedup_vs_dense=dense_ms / ms, commit=commit, device="GPU", jax_version="0", prompt_len=8,
                new_tokens=4, **kw)


def test_merge_writes_records_and_plots_and_readme_keeps_the_latest_run(tmp_path, monkeypatch, load_script):
    """--merge joins runs into one JSON (a record per line) with the bar chart and the grid
    figure; README's sparse table shows the latest run of each setting and names per_row."""
    from dejavu_jax.bench import short_floats
    from dejavu_jax.bench_sparse import main

    thr = dict(selection="threshold")
    old = [_rec("opt-13b", 1, "dense", 1.0, 1.0, 10.0, 10.0, "aaa"),
           _rec("opt-13b", 1, "sparse", 0.1, 0.5, 5.0, 10.0, "aaa", **thr)]
    new = [_rec("opt-13b", 1, "dense", 1.0, 1.0, 9.0, 9.0, "bbb")]
    new += [_rec("opt-13b", 1, "sparse", d, k, 9.0 * d / k, 9.0, "bbb", **thr) for d in (0.05, 0.1, 0.2)
            for k in (0.25, 0.5, 1.0)]
    new += [_rec("opt-13b", b, "sparse", 0.1, 0.5, 10.0 + b, 10.0, "bbb", batch_mode=m, **thr)
            for b in (4, 16) for m in ("union", "per_row")]
    files = []
    for i, recs in enumerate((old, new)):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(recs))
    out = tmp_path / "out"
    main(["--merge", *map(str, files), "--out", str(out)])
    text = (out / "sparse_decode.json").read_text()
    assert json.loads(text) == short_floats(old + new) and text.count("\n") == len(old + new) + 2
    assert (out / "sparse_decode.png").stat().st_size > 0 and (out / "sparse_decode_grid.png").stat().st_size > 0
    assert variant(new[-1]) == "sel=threshold,per_row"
    mod = load_script("update_readme_results")
    monkeypatch.setattr(mod, "RESULTS", out)
    rows = [r for r in mod.sparse_table().splitlines() if r.startswith("| opt-13b | 1 |")]
    assert len(rows) == 1 + 9 and all("bbb" in r for r in rows)  # the older run's two records are not shown
    assert rows[0].split("|")[3].strip() == "dense"
    assert "sel=threshold,per_row" in mod.sparse_table()


def test_merge_of_variants_plots_the_kernel_parts(tmp_path):
    """--merge --variants: the same-run A/B chart (one bar a sparse record, its profile's kernel
    time stacked by part), no grid; kernel_parts puts every family in one part."""
    from dejavu_jax.bench_sparse import main
    from dejavu_jax.bench_sparse_report import KERNEL_PARTS, kernel_parts

    profile = {"families": {"dejavu_q_kv_cache_": {"ms": 2.0}, "anonymous_mosaic_gpu_kernel": {"ms": 0.8},
                            "dejavu_add_layer_norm_split": {"ms": 0.2}, "input_reduce_fusion": {"ms": 0.1},
                            "loop_convert_fusion": {"ms": 0.05}}}
    parts = kernel_parts(profile)
    assert list(parts) == [name for _, name in KERNEL_PARTS]
    assert parts["q + K/V (+ hosted sets)"] == 2.0 and parts["boundaries"] == 0.2 and parts["other"] == 0.05
    assert sum(parts.values()) == pytest.approx(3.15)
    recs = [_rec("opt-13b", 1, "dense", 1.0, 1.0, 9.0, 9.0, "ccc"),
            dict(_rec("opt-13b", 1, "sparse", 0.1, 0.5, 4.0, 9.0, "ccc", selection="threshold"), profile=profile),
            _rec("opt-13b", 1, "sparse", 0.1, 0.5, 4.2, 9.0, "ccc", selection="threshold", boundary_sums="unfused")]
    (tmp_path / "run.json").write_text(json.dumps(recs))
    main(["--merge", str(tmp_path / "run.json"), "--out", str(tmp_path / "out"), "--name", "ab", "--variants"])
    assert (tmp_path / "out" / "ab.png").stat().st_size > 0 and not (tmp_path / "out" / "ab_grid.png").exists()
    assert variant(recs[2]) == "sel=threshold,boundary_sums=unfused"
