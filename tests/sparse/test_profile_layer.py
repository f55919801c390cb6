"""scripts/profile_sparse_layer.py runs end to end (CPU, a tiny model) and writes what it says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profile_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_sparse_layer", ROOT / "scripts/profile_sparse_layer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--smoke", "--quick", "--only", "select,predictors,sets", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "layer_kernels.json").read_text())
    recs = {f"{r['group']}/{r['variant']}": r for r in data["records"]}
    assert {"glue/glue", "dense/mlp_xla", "select/compact_xla", "predictors/mlp_scores",
            "predictors/mlp_scores_matvec_auto", "sets/unfused", "sets/fused_auto", "sets/fused_xla_prep"} <= set(recs)
    assert not any(g.startswith(("kv_all", "mlp_mosaic")) for g in recs)  # --only
    assert all("error" not in r for r in recs.values()), [r for r in recs.values() if "error" in r]
    mlp = recs["predictors/mlp_scores"]
    assert mlp["bytes_per_layer"] > 0 and mlp["wall_us"] > 0 and "GBps" in mlp and "commit" in mlp
    assert recs["dense/mlp_xla"]["frac_of_dense_gemv"] == 1.0
    assert (tmp_path / "layer_kernels.png").stat().st_size > 0
