"""scripts/bench_multi_gpu.py runs end to end on the CPU (--tiny: 2 simulated devices)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_multi_gpu_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_multi_gpu.py"), "--tiny", "--batches", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "multi_gpu.json").read_text())
    recs = {(r["devices"], r["path"]): r for r in res["records"]}
    assert set(recs) == {(2, "dense"), (2, "sparse"), (1, "dense"), (1, "sparse")}, res["records"]
    assert all(r["ms_per_token"] > 0 for r in recs.values())
    row = res["summary"][0]
    for key in ("sparse_vs_dense_on_tp", "dense_scaling_efficiency", "sparse_scaling_efficiency"):
        assert row[key] > 0
    assert {t["figure"] for t in res["targets"]} == {"sparse_vs_dense_on_tp", "dense_tp_vs_one"}
    assert (tmp_path / "multi_gpu.png").stat().st_size > 0
