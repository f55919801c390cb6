"""Reporting of the sparse decode benchmark (`dejavu_jax.bench_sparse`, which re-exports these):
the bar chart, the density x heads heatmaps, the records' JSON, a record's variant label and
the printed table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dejavu_jax.figures import save_figure


PLOT_BARS = (("default", 0.10, 0.50), ("sel=threshold", 0.10, 0.50), ("sel=threshold,kv=selected", 0.10, 0.50),
             ("sel=threshold", 0.05, 0.25))


def model_size(name: str) -> float:
    """Parameters in billions from an OPT preset name ("opt-13b" -> 13, "opt-125m" -> 0.125),
    for ordering models."""
    return float(name.split("-")[-1].rstrip("bm")) * (1 if name.endswith("b") else 1e-3)


def plot(records, path: Path) -> None:
    """Bar chart: batch-1 speedup over dense per model for the `PLOT_BARS` variants (the
    latest record of each), dashed lines at the issue's 2.5x (13B) and 3.0x (30B) targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {}
    for r in records:
        if r.get("batch") == 1 and r.get("impl") == "sparse" and "speedup_vs_dense" in r:
            latest[(r["model"], variant(r), r["mlp_density"], r["head_keep"])] = r
    models = sorted(dict.fromkeys(m for m, *_ in latest), key=model_size)
    bars = [b for b in PLOT_BARS if any(key[1:] == b for key in latest)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) * max(1, len(bars)) / 2), 4))
    w = 0.8 / max(1, len(bars))
    for j, (var, dens, keep) in enumerate(bars):
        vals = [latest.get((m, var, dens, keep), {}).get("speedup_vs_dense", 0) for m in models]
        sel = "threshold" if "threshold" in var else "top-k"
        kv = ", K/V selected heads" if "kv=selected" in var else ""
        ax.bar(np.arange(len(models)) + j * w, vals, w, label=f"{sel} mlp {dens:.0%} / heads {keep:.0%}{kv}")
    ax.axhline(1.0, color="k", lw=0.8)
    for m, target in (("opt-13b", 2.5), ("opt-30b", 3.0)):
        if m in models:
            i = models.index(m)
            ax.hlines(target, i - 0.1, i + 0.9, colors="r", linestyles="dashed", lw=1)
    ax.set_xticks(np.arange(len(models)) + w * (len(bars) - 1) / 2, models)
    ax.set_ylabel("speedup vs dense_decode (batch 1)")
    dev = next(iter(latest.values()), {}).get("device", "")
    ax.set_title(f"sparse_decode, random weights ({dev}); red dashes: targets")
    if bars:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120, colors=32)  # flat bars
    plt.close(fig)


# kernel-name prefixes of a sparse step's profile -> the part of a layer they do (first match wins)
KERNEL_PARTS = (("dejavu_q_kv_cache", "q + K/V (+ hosted sets)"),
                (("anonymous_mosaic_gpu_kernel", "dejavu_boundary_mlp"), "MLP"),
                ("dejavu_gather_matvec_t", "out-projection"), ("dejavu_add_layer_norm", "boundaries"),
                ("input_reduce_fusion", "XLA partial sums"), ("dejavu_sets", "sets"),
                ("dejavu_head_sparse_decode_attention", "attention"), ("", "other"))


def kernel_parts(profile: dict) -> dict:
    """A record's CUPTI profile -> kernel ms a token per `KERNEL_PARTS` part."""
    parts = dict.fromkeys((name for _, name in KERNEL_PARTS), 0.0)
    for family, v in profile["families"].items():
        parts[next(name for prefix, name in KERNEL_PARTS if family.startswith(prefix))] += v["ms"]
    return parts


def plot_variants(records, path: Path) -> None:
    """Same-run variants (an A/B run): one horizontal bar a sparse record, its kernel ms a token
    stacked by `KERNEL_PARTS` where it has a profile, the wall ms/token marked, labelled with
    its variant and speedup over the dense record of its job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("impl") == "sparse" and "ms_per_token" in r]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 2.2))
    colors = dict(zip((name for _, name in KERNEL_PARTS), plt.get_cmap("tab10").colors))
    for i, r in enumerate(rows):
        left = 0.0
        for name, ms in (kernel_parts(r["profile"]) if r.get("profile") else {"other": r["ms_per_token"]}).items():
            ax.barh(i, ms, left=left, color=colors[name], label=name if i == 0 or not rows[0].get("profile") else None)
            left += ms
        ax.plot([r["ms_per_token"]] * 2, [i - 0.4, i + 0.4], color="k", lw=1.5)
        label = f"{r['ms_per_token']:.2f} ms ({r.get('speedup_vs_dense', 0):.2f}x)"
        ax.text(max(left, r["ms_per_token"]) + 0.03, i, label, va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{r.get('commit', '')[:7]} {r['model']} {variant(r)}"[:80] for r in rows],
                  fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms / token (bars: kernel time by part; black tick: wall time)")
    dev = rows[0].get("device", "") if rows else ""
    ax.set_title(f"same-run variants, batch 1 ({dev})", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4)
    ax.set_xlim(0, max((r["ms_per_token"] for r in rows), default=1) * 1.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, colors=32)  # flat bars: 32 colours read the same, a third smaller
    plt.close(fig)


def dump_records(records) -> str:
    """JSON list text, one record per line (`dejavu_jax.bench.dump_json`)."""
    from dejavu_jax.bench import dump_json

    return dump_json(list(records))


def plot_grid(records, path: Path) -> None:
    """Batch-1 speedup over dense as heatmaps of MLP density x heads kept, one per model
    (the latest default threshold record of each cell), and speedup against batch size for
    the union sets and per-row masks (10% / 50%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, batches = {}, {}
    for r in records:
        if r.get("impl") != "sparse" or "speedup_vs_dense" not in r:
            continue
        var = variant(r)
        if r["batch"] == 1 and var == "sel=threshold":
            cells[(r["model"], r["mlp_density"], r["head_keep"])] = r["speedup_vs_dense"]
        if var in ("sel=threshold", "sel=threshold,per_row") and (r["mlp_density"], r["head_keep"]) == (0.1, 0.5):
            batches[(r["model"], var, r["batch"])] = r["speedup_vs_dense"]
    dens, keeps = (0.05, 0.1, 0.2), (0.25, 0.5, 1.0)
    models = sorted({m for m, d, k in cells if sum((m, a, b) in cells for a in dens for b in keeps) >= 6},
                    key=model_size)
    curves = sorted({(m, v) for m, v, b in batches if b > 1})
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(2.6 * (len(models) + 1), 2.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        grid = np.array([[cells.get((m, d, k), np.nan) for k in keeps] for d in dens])
        ax.imshow(grid, cmap="viridis", vmin=1.0, vmax=3.5, origin="lower")
        for i in range(len(dens)):
            for j in range(len(keeps)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(keeps)), [f"{k:.0%}" for k in keeps])
        ax.set_yticks(range(len(dens)), [f"{d:.0%}" for d in dens])
        ax.set_xlabel("heads kept")
        ax.set_title(m, fontsize=9)
    axes[0][0].set_ylabel("MLP density (batch 1)")
    ax = axes[0][-1]
    for m, v in curves:
        bs = sorted(b for mm, vv, b in batches if (mm, vv) == (m, v))
        ax.plot(bs, [batches[(m, v, b)] for b in bs], "o-", label=f"{m} {'per-row' if 'per_row' in v else 'union'}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (10% / 50%)")
    ax.set_title("x dense by batch", fontsize=9)
    if curves:
        ax.legend(fontsize=6)
    dev = next((r.get("device", "") for r in records if r.get("device")), "")
    fig.suptitle(f"sparse_decode speedup vs dense_decode, threshold sets, K/V of every head ({dev})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    from PIL import Image  # a few colours: keep the committed plot small

    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)


def variant(r: dict) -> str:
    """What differs from the default sparse_decode in a record (kernels, selection, KV, flags)."""
    parts = []
    if r.get("kernel_impl", "auto") != "auto":
        parts.append(r["kernel_impl"])
    if r.get("selection", "top_k") != "top_k":
        parts.append("sel=" + r["selection"])
    if not r.get("lookahead", True):
        parts.append("in-layer")
    if r.get("kv_policy", "all") != "all":
        parts.append("kv=" + r["kv_policy"])
    if r.get("batch_mode", "union") != "union":
        parts.append(r["batch_mode"])
    if r.get("predictor_stream"):
        parts.append("stream")
    from dejavu_jax.bench_sparse import FUSIONS  # the fusion switches' setting keys

    for key in FUSIONS:
        if r.get(key, "auto") != "auto":
            parts.append(f"{key}={r[key]}")
    if r.get("combine"):
        parts.append("combine=" + r["combine"])
    if r.get("xla_flags"):
        parts.append("flags")
    constants = r.get("constants") or {}
    short = [name.rpartition(".")[2] for name in constants]
    for name, value in constants.items():  # module.NAME where two modules' NAMEs are alike
        tail = name.rpartition(".")[2]
        parts.append(f"{tail if short.count(tail) == 1 else '.'.join(name.split('.')[-2:])}={value}")
    return ",".join(parts) or "default"


def table(records) -> str:
    rows = [f"{'model':9} {'B':>3} {'impl':8} {'mlp':>5} {'head':>5} {'variant':22} {'ms/tok':>7} {'x dense':>7} "
            f"{'x hf':>6} {'kern/tok':>8} {'kern ms':>7}"]
    for r in records:
        if "ms_per_token" not in r:
            rows.append(f"{r.get('model', '?'):9} {r.get('batch', '?'):>3} {r.get('impl', '?'):8} "
                        f"error {str(r.get('error'))[:90]}")
            continue
        prof = r.get("profile", {})
        rows.append(f"{r.get('model', '?'):9} {r['batch']:>3} {r['impl']:8} {r['mlp_density']:5.2f} {r['head_keep']:5.2f} "
                    f"{variant(r)[:22]:22} {r['ms_per_token']:7.2f} {r.get('speedup_vs_dense', 0):7.2f} "
                    f"{r.get('speedup_vs_hf_torch', 0):6.2f} {prof.get('kernels_per_token', 0):8.0f} "
                    f"{prof.get('kernel_ms_per_token', 0):7.2f}")
    return "\n".join(rows)
