"""Figures for the oracle analysis and the predictors (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dejavu_jax.figures import save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=120, colors=64)
    _plt().close(fig)
    return path


def oracle_plots(report: dict, out: Path) -> list[Path]:
    """oracle_sparsity.png, oracle_heads.png, oracle_cosine.png, oracle_ppl.png."""
    plt = _plt()
    files = []
    sp = report["sparsity"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    layers = [s["layer"] for s in sp]
    mean = np.array([s["active_mean"] for s in sp])
    lo = mean - np.array([s["active_p10"] for s in sp])
    hi = np.array([s["active_p90"] for s in sp]) - mean
    ax.bar(layers, mean, yerr=[lo, hi], capsize=3, color="tab:blue")
    ax.set(xlabel="layer", ylabel="active fc1 neurons (share)", title="MLP activation density (bars: p10-p90)")
    ax.set_xticks(layers)
    files.append(_save(fig, out / "oracle_sparsity.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for h in report["heads"]:
        share = h["sorted_share"]
        ax.plot(range(1, len(share) + 1), np.cumsum(share), marker=".", label=f"layer {h['layer']}")
    ax.set(xlabel="heads kept (largest output norm first)", ylabel="share of summed head norm",
           title="Head importance (cumulative, mean over tokens)")
    ax.legend(fontsize=7, ncol=2)
    files.append(_save(fig, out / "oracle_heads.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    cos = report["cosine"]
    ax.plot([c["layer"] for c in cos], [c["cos_attn_prev"] for c in cos], marker="o", label="x(l-1) vs x(l)")
    ax.plot([c["layer"] for c in cos], [c["cos_attn_prev_mlp"] for c in cos], marker="s",
            label="x(l-1) vs MLP input(l)")
    ax.set(xlabel="layer l", ylabel="mean cosine similarity", title="Lookahead premise: consecutive residual inputs",
           ylim=(min(0.0, min(c["cos_attn_prev"] for c in cos) - 0.05) if cos else 0, 1.02))
    ax.set_xticks([c["layer"] for c in cos])
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "oracle_cosine.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    dense = report["ppl_dense"]
    for ax, curve, xl in ((a1, report["mlp_curve"], "MLP density (true top-k neurons kept)"),
                          (a2, report["head_curve"], "heads kept (true top-k by norm)")):
        ax.plot([p["density"] for p in curve], [p["ppl"] for p in curve], marker="o", label="oracle, all layers")
        if ax is a1 and report.get("mlp_curve_layer0_dense"):
            c0 = report["mlp_curve_layer0_dense"]
            ax.plot([p["density"] for p in c0], [p["ppl"] for p in c0], marker="s", label="oracle, layer 0 dense")
        ax.axhline(dense, color="k", lw=0.8, label="dense")
        ax.axhline(dense * 1.01, color="gray", ls="--", lw=0.8, label="+1%")
        ax.set(xlabel=xl, ylabel="perplexity", yscale="log")
        ax.legend(fontsize=8)
    fig.suptitle("Quality vs density, oracle selection (mask-only)")
    files.append(_save(fig, out / "oracle_ppl.png"))
    return files


def predictor_plots(evaluation: dict, out: Path, *, same_layer: dict | None = None,
                    sweep: list[dict] | None = None, ppl_curves: dict | None = None) -> list[Path]:
    """predictors_recall.png (per-layer recall vs density, predictor vs oracle),
    predictors_layers.png (calibrated density and recalls per layer, lookahead vs same-layer),
    predictors_rank_sweep.png (when a sweep is given), predictors_ppl.png (when ppl_curves
    {"dense": float, name: [{"density", "ppl"}]} are given)."""
    plt = _plt()
    files = []
    if ppl_curves:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        dense = ppl_curves["dense"]
        for name, curve in ppl_curves.items():
            if name != "dense":
                ax.plot([p["density"] for p in curve], [max(100 * (p["ppl"] / dense - 1), 1e-3) for p in curve],
                        marker="o", label=name)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8, label="+1%")
        ax.set(xlabel="MLP density (every layer; heads dense)", ylabel="perplexity increase over dense (%)",
               yscale="log", title="Mask-only quality vs MLP density")
        ax.legend(fontsize=8)
        files.append(_save(fig, out / "predictors_ppl.png"))
    curves = evaluation["curves"]
    cols = min(4, len(curves))
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for c, ax, rec in zip(curves, axes.flat, evaluation["layers"]):
        F = len(c["mlp"]["active_recall"])
        dens = np.arange(1, F + 1) / F
        ax.plot(dens, c["mlp"]["active_recall"], label="active recall")
        ax.plot(dens, c["mlp"]["mass_recall"], label="mass recall")
        ax.plot(dens, c["oracle_mass"], ls="--", color="gray", label="oracle mass")
        ax.axvline(rec["mlp_density"], color="k", lw=0.6)
        ax.set(xlim=(0, min(1, 3 * rec["mlp_density"] + 0.05)), ylim=(0.5, 1.005), title=f"layer {rec['layer']}",
               xlabel="density")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Predictor recall vs MLP density (held-out; vertical: calibrated k)")
    files.append(_save(fig, out / "predictors_recall.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    variants = [("lookahead" if evaluation["layers"][0]["lookahead"] else "same-layer", evaluation["layers"])]
    if same_layer is not None:
        variants.append(("same-layer", same_layer["layers"]))
    w = 0.8 / len(variants)
    layers = np.array([r["layer"] for r in evaluation["layers"]])
    for i, (name, recs) in enumerate(variants):
        x = layers + (i - (len(variants) - 1) / 2) * w
        a1.bar(x, [r["mlp_density"] for r in recs], width=w, label=name)
        a2.bar(x, [r["mass_recall_at"]["0.1"] for r in recs], width=w, label=f"{name}: mass recall")
        a2.plot(x, [r["recall_at"]["0.1"] for r in recs], "o", color=f"C{i}", mec="k",
                label=f"{name}: active recall")
    for ax in (a1, a2):
        ax.set_xticks(layers)
    a1.set(xlabel="layer", ylabel="MLP density (k / F)", title="Calibrated MLP density")
    a2.set(xlabel="layer", ylim=(0.0, 1.01), title="Recall at MLP density 10%")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    files.append(_save(fig, out / "predictors_layers.png"))

    if sweep:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ranks = [s["rank"] for s in sweep]
        ax.plot(ranks, [s["mean_needed_density"] for s in sweep], marker="o", label="mean density for the target")
        ax.set(xscale="log", xlabel="predictor rank r", ylabel="MLP density needed")
        ax2 = ax.twinx()
        ax2.plot(ranks, [s["bytes_frac"] for s in sweep], marker="s", color="tab:red", label="bytes / layer")
        ax2.set(ylabel="predictor bytes / layer bytes")
        ax.set_title("Rank sweep")
        fig.legend(fontsize=7, loc="upper center")
        files.append(_save(fig, out / "predictors_rank_sweep.png"))
    return files
