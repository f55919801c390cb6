"""scripts/profile_sparse_layer.py runs end to end (CPU, a tiny model) and writes what it says."""

from __future__ import annotations

import json


def test_profile_script_smoke(tmp_path, load_script):
    mod = load_script("profile_sparse_layer")
    mod.main(["--smoke", "--quick", "--only", "select,predictors,sets,q_kv_cache", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "layer_kernels.json").read_text())
    recs = {f"{r['group']}/{r['variant']}": r for r in data["records"]}
    assert {"glue/glue", "dense/mlp_xla", "select/compact_xla", "predictors/mlp_scores",
            "predictors/mlp_scores_matvec_auto", "sets/unfused", "sets/fused_auto", "sets/fused_xla_prep",
            "q_kv_cache/auto", "q_kv_cache/bk8"} <= set(recs)
    assert not any(g.startswith(("kv_all", "mlp_mosaic")) for g in recs)  # --only
    assert all("error" not in r for r in recs.values()), [r for r in recs.values() if "error" in r]
    mlp = recs["predictors/mlp_scores"]
    assert mlp["bytes_per_layer"] > 0 and mlp["wall_us"] > 0 and "GBps" in mlp and "commit" in mlp
    assert recs["dense/mlp_xla"]["frac_of_dense_gemv"] == 1.0
    assert (tmp_path / "layer_kernels.png").stat().st_size > 0


def test_decode_step_extraction(load_script):
    """The step's kernels are the extra ones between the profiles' common prefix and suffix,
    and the per-layer pattern is the repeating family sequence with mean times."""
    mod = load_script("profile_decode_step")
    layer = [("ln_fusion.3", 1e-3), ("dejavu_gather_matvec", 40e-3), ("add_fusion_7", 2e-3)]
    pre, post = [("prefill_gemm", 1.0)], [("sample", 0.02)]
    step = [("embed", 1e-3)] + layer * 3 + [("lm_head", 0.2), ("argmax", 0.01)]
    renumbered = [(n.replace("fusion.3", "fusion.12"), t) for n, t in step]  # compiled apart
    one, two = pre + renumbered + post, pre + step + step + post  # N and N + 1 tokens
    got = mod.step_kernels(one, two)
    assert [n for n, _ in got] == [n for n, _ in step]
    pat = mod.layer_pattern(got, layers=3)
    assert pat["period"] == 3 and pat["repeats"] == 3
    assert [p["kernel"] for p in pat["pattern"]] == ["ln_fusion", "dejavu_gather_matvec", "add_fusion"]
    assert abs(pat["us_per_layer"] - 43.0) < 1e-9
    assert mod.layer_pattern([("a", 1.0), ("b", 2.0)], layers=4) == {}  # nothing repeats
    several = (step + [("sample", 0.02)]) * 5  # five steps: the step repeats, the layer is found
    assert mod.layer_pattern(several, layers=3)["period"] == 3


def test_decode_step_smoke(tmp_path, load_script):
    load_script("profile_decode_step").main(["--smoke", "--hlo", "--tokens", "2", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "decode_step.json").read_text())
    assert rec["layers"] == 3 and rec["kv_policy"] == "all" and "commit" in rec
    assert "sparse_decode_loop" in (tmp_path / "decode_step_hlo.txt").read_text()[:2000]
