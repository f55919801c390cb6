"""Reporting of the kernel benchmark (scripts/bench_kernels.py, which re-exports these): the
log that ends up in bench_log.txt, the batch-1 and batched plots, the merge of several runs'
kernels.json files and the printed summary table."""

from __future__ import annotations

import json
import os

import numpy as np

from dejavu_jax.bench import dump_json
from dejavu_jax.figures import save_figure

LOG = []


def log(*a):
  s = " ".join(str(x) for x in a)
  print(s, flush=True)
  LOG.append(s)


def _series(records, **match):
  rs = [r for r in records if all(r.get(k) == v for k, v in match.items())]
  return sorted(rs, key=lambda r: r["density"])


def _curves(ax, rs, y_key, ls, color, label):
  """One series of a figure's two panels, by density (%): ``y_key`` left, the speedup over the
  dense MLP right."""
  xs = [100 * r["density"] for r in rs]
  ax[0].plot(xs, [r[y_key] for r in rs], ls, color=color, marker="o", ms=3, label=label)
  ax[1].plot(xs, [r.get("speedup_vs_dense", np.nan) for r in rs], ls, color=color, marker="o", ms=3, label=label)


def _save(fig, ax, path):
  """Legends and grids on both panels, then the figure saved and closed."""
  import matplotlib.pyplot as plt

  for a in ax:
    a.legend(fontsize=6, ncol=2)
    a.grid(alpha=0.3)
  fig.tight_layout()
  save_figure(fig, path, dpi=110, colors=32)  # lines and markers of a few colours
  plt.close(fig)


def plots(records, peak, out_dir):
  """kernels.png (batch 1: bandwidth and speedup vs density) and kernels_batched.png."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ideal_x = np.array([2, 5, 10, 20, 50, 100.0])
  mlp = [r for r in records if r["op"] == "sparse_mlp"]
  ds = sorted({r["d_model"] for r in mlp if r["batch"] == 1})
  if ds:
    fig, ax = plt.subplots(1, 2, figsize=(13, 5))
    for i, d in enumerate(ds):
      color = f"C{i}"
      for variant, ls in (("mosaic", "-"), ("xla_gather", ":")):
        rs = _series(mlp, d_model=d, batch=1, variant=variant)
        if not rs:
          continue
        _curves(ax, rs, "eff_GBps", ls, color, f"{'pallas' if variant == 'mosaic' else variant} d={d}")
    ax[0].axhline(peak, color="k", lw=1, label=f"peak read {peak:.0f} GB/s")
    ax[0].set(xscale="log", xlabel="density (%)", ylabel="effective GB/s (bytes read / time)",
              title="sparse MLP, batch 1 (pallas = Mosaic GPU kernel)")
    ax[1].plot(ideal_x, 100 / ideal_x, "k--", label="ideal 1/density")
    ax[1].set(xscale="log", yscale="log", xlabel="density (%)",
              ylabel="speedup vs dense XLA MLP", title="sparse MLP, batch 1: speedup")
    _save(fig, ax, os.path.join(out_dir, "kernels.png"))
  bs = sorted({r["batch"] for r in mlp if r["batch"] > 1})
  if bs:
    fig, ax = plt.subplots(1, 2, figsize=(13, 5))
    for i, b in enumerate(bs):
      for j, d in enumerate(sorted({r["d_model"] for r in mlp if r["batch"] == b})):
        rs = _series(mlp, d_model=d, batch=b, variant="triton")
        if not rs:
          continue
        _curves(ax, rs, "frac_of_peak_bw", ["-", "--", ":", "-."][j % 4], f"C{i}", f"B={b} d={d}")
    ax[0].set(xscale="log", xlabel="union density (%)", ylabel="fraction of peak read BW",
              title="sparse MLP, batched (Triton split kernels)")
    ax[1].plot(ideal_x, 100 / ideal_x, "k--", label="ideal 1/density")
    ax[1].set(xscale="log", yscale="log", xlabel="union density (%)",
              ylabel="speedup vs dense XLA MLP", title="sparse MLP, batched: speedup")
    _save(fig, ax, os.path.join(out_dir, "kernels_batched.png"))
  log("wrote plots")


def merge(paths, out_dir):
  """Merge kernels.json files of several runs (each record keeps its run's commit and
  peak) into out_dir/kernels.json and redraw the plots; no GPU needed."""
  runs, records = [], []
  for p in paths:
    with open(p) as f:
      j = json.load(f)
    runs.append({"file": os.path.basename(os.path.dirname(p)) or p,
                 "peak_read_GBps": j["peak_read_GBps"],
                 "commit": j["records"][0]["commit"] if j["records"] else ""})
    for r in j["records"]:
      r.setdefault("peak_read_GBps", j["peak_read_GBps"])
      records.append(r)
  peak = max(r["peak_read_GBps"] for r in runs)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "kernels.json"), "w") as f:
    f.write(dump_json({"peak_read_GBps": peak, "runs": runs, "records": records}))
  plots(records, peak, out_dir)
  summary(records, peak)


def summary(records, peak):
  log("")
  log(f"== summary (peak read {peak:.0f} GB/s) ==")
  log(f"{'op':22s} {'d':>5s} {'dens':>5s} {'B':>3s} {'variant':26s} {'us':>8s} "
      f"{'peak':>5s} {'fix':>6s} {'x dense':>7s} {'x gath':>6s}")
  for r in records:
    if r["impl"] != "pallas":
      continue
    log(f"{r['op'][:22]:22s} {r['d_model']:5d} {r['density']:5.2f} {r['batch']:3d} "
        f"{r['variant'][:26]:26s} {r['us']:8.1f} {r['frac_of_peak_bw']:5.2f} "
        f"{r['fixed_us']:6.1f} {r.get('speedup_vs_dense', float('nan')):7.2f} "
        f"{r.get('speedup_vs_xla_gather', float('nan')):6.2f}")
