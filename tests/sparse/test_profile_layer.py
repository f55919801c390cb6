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


def test_profile_merge_and_mlp_check(tmp_path, load_script):
    """--merge joins a merged file (kept whole) and a run's file (its run added, its variants
    suffixed with the commit); the plot shows each variant's last record; mlp_error measures a
    sparse MLP piece against the jnp reference (0 for the reference itself, large for a wrong one)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.sparse_mlp import sparse_mlp_reference

    mod = load_script("profile_sparse_layer")
    def rec(variant, us, commit):
        return {"model": "m", "group": "mlp_mosaic", "variant": variant, "kernel_us": us, "wall_us": us,
                "commit": commit}
    old = {"note": "n", "runs": [{"commit": "aaa"}], "records": [rec("auto", 25.0, "aaa"), rec("r1", 27.0, "aaa")]}
    new = {"peak": {"peak_GBps": 2700.0}, "device": "H100", "jax_version": "0.11.2", "commit": "bbb",
           "records": [rec("auto", 24.0, "bbb"), {**rec("tma", 0.0, "bbb"), "error": "x"}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    got = mod.merge([tmp_path / "old.json", tmp_path / "new.json"], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "layer_kernels.json").read_text()) == got
    assert got["note"] == "n" and [r["commit"] for r in got["runs"]] == ["aaa", "bbb"]
    assert [r["variant"] for r in got["records"]] == ["auto", "r1", "auto @bbb", "tma @bbb"]
    shown = mod.latest(got["records"])
    assert [(r["variant"], r["kernel_us"]) for r in shown] == [("auto @bbb", 24.0), ("r1", 27.0)]
    assert (tmp_path / "out" / "layer_kernels.png").stat().st_size > 0

    rng = np.random.default_rng(0)
    d, f = 64, 40
    mlp = {"fc1": jnp.asarray(rng.normal(size=(f, d)), jnp.float32), "b1": jnp.zeros((f,)),
           "fc2_t": jnp.asarray(rng.normal(size=(f, d)), jnp.float32), "b2": jnp.zeros((d,))}
    arrays = {"layers": [{"mlp": mlp}], "idx": jnp.arange(f, dtype=jnp.int32)}
    x = jax.random.normal(jax.random.key(0), (1, d))
    good = lambda a, l, x: sparse_mlp_reference(x, mlp["fc1"], mlp["b1"], mlp["fc2_t"], mlp["b2"],  # noqa: E731
                                                a["idx"], count=4)
    assert mod.mlp_error(good, arrays, x, 0.1) == 0.0
    assert mod.mlp_error(lambda a, l, x: good(a, l, x) * 1.1, arrays, x, 0.1) > mod.MLP_TOL


def test_dump_json_is_line_wise_and_exact():
    """Results files: the same JSON, a record a line, floats to 7 significant digits."""
    from dejavu_jax.bench import dump_json

    data = {"peak": {"GBps": 2.5}, "records": [{"a": 1, "b": [1, 2]}, {"a": 2, "ok": True, "s": None}]}
    text = dump_json(data)
    assert json.loads(text) == data and text.count("\n") == 7
    assert json.loads(dump_json([{"x": 1}])) == [{"x": 1}] and json.loads(dump_json(3)) == 3
    got = json.loads(dump_json({"records": [{"ms": 9.863469269841207, "p": {"f": [1.0e-7 / 3, 123456789.0]}}]}))
    assert got == {"records": [{"ms": 9.863469, "p": {"f": [3.333333e-08, 123456800.0]}}]}
