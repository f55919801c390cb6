"""Oracle analysis (``dejavu analyze``): does the paper's premise hold on this model?

From held-out activations (`collect.py`) and perplexity runs with the true top units kept
(`masked_eval.py`):

* MLP sparsity per layer: the share of fc1 neurons active (ReLU > 0) per token;
* head importance: each layer's heads sorted by output norm, their mean share of the
  summed norm, and how many heads hold 90% of it;
* quality vs density: perplexity when only the true top-k neurons (or heads) are kept (in
  every layer, and with layer 0 dense), and the smallest density within 1% / 2% of dense;
* the lookahead premise: cosine similarity of consecutive layers' attention inputs.

Results go to ``<out>/oracle.json`` and ``<out>/oracle_*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dejavu_jax.model import OPTModel
from dejavu_jax.predictors import plots
from dejavu_jax.predictors.masked_eval import oracle_curve, perplexity
from dejavu_jax.predictors.shards import ActivationSet

MLP_DENSITIES = (0.02, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
HEAD_KEEPS = (0.25, 0.5, 0.75)


def sparsity_stats(acts: ActivationSet, max_positions: int | None = None) -> list[dict]:
    """Per layer: mean / p10 / p50 / p90 over tokens of the active fraction of fc1 neurons, and
    the share of neurons never active on these positions."""
    out = []
    for l in range(acts.num_layers):
        bits = np.unpackbits(acts.load("mlp_active", [l], max_positions)[0], axis=-1)
        bits = bits[:, :acts.meta["config"]["ffn_dim"]].astype(bool)
        frac = bits.mean(-1)
        out.append({"layer": l, "active_mean": float(frac.mean()), "active_p10": float(np.percentile(frac, 10)),
                    "active_p50": float(np.percentile(frac, 50)), "active_p90": float(np.percentile(frac, 90)),
                    "never_active": float((~bits.any(0)).mean())})
    return out


def head_importance(acts: ActivationSet, max_positions: int | None = None) -> list[dict]:
    """Per layer: mean share of the summed head norm held by the 1st, 2nd, ... largest head
    ("sorted_share": [H]), and the mean number of heads holding 90% of it."""
    norms = acts.load("head_norm", None, max_positions).astype(np.float64)  # [L, N, H]
    share = -np.sort(-norms, axis=-1) / np.maximum(norms.sum(-1, keepdims=True), 1e-30)
    heads_90 = (np.cumsum(share, -1) < 0.9).sum(-1) + 1
    return [{"layer": l, "sorted_share": share[l].mean(0).tolist(), "heads_for_90pct": float(heads_90[l].mean()),
             "top1_share": float(share[l, :, 0].mean())} for l in range(norms.shape[0])]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def lookahead_cosine(acts: ActivationSet, max_positions: int | None = None) -> list[dict]:
    """Per layer l >= 1: mean cosine of (attention input of l-1, of l) - the lookahead
    premise - and of (attention input of l-1, MLP input of l), what a lookahead MLP
    predictor reads vs what the layer's MLP reads."""
    attn = acts.load("attn_in", None, max_positions)
    mlp = acts.load("mlp_in", None, max_positions)
    return [{"layer": l, "cos_attn_prev": float(_cos(attn[l - 1], attn[l]).mean()),
             "cos_attn_prev_mlp": float(_cos(attn[l - 1], mlp[l]).mean()),
             "cos_attn_mlp_same": float(_cos(attn[l], mlp[l]).mean())} for l in range(1, attn.shape[0])]


def loss_threshold_density(curve: list[dict], ppl_dense: float, rel: float) -> float | None:
    """Smallest density in ``curve`` whose perplexity is within ``rel`` (0.01 = 1%) of dense,
    such that every larger density measured is too; None if none is."""
    ok = None
    for point in sorted(curve, key=lambda p: -p["density"]):
        if point["ppl"] <= ppl_dense * (1 + rel):
            ok = point["density"]
        else:
            break
    return ok


def oracle_analysis(model: OPTModel, activations, eval_windows: np.ndarray, *, mlp_densities=MLP_DENSITIES,
                    head_keeps=HEAD_KEEPS, max_positions: int | None = 20000, batch_size: int = 8) -> dict:
    """All of the module docstring's figures as a dict (what oracle.json holds)."""
    acts = activations if isinstance(activations, ActivationSet) else ActivationSet(activations, "heldout")
    ppl_dense = perplexity(model, eval_windows, batch_size=batch_size)
    mlp_curve = oracle_curve(model, eval_windows, mlp_densities, unit="mlp", batch_size=batch_size)
    mlp_curve_l0 = oracle_curve(model, eval_windows, mlp_densities, unit="mlp", dense_layers=(0,),
                                batch_size=batch_size)
    head_curve = oracle_curve(model, eval_windows, head_keeps, unit="heads", batch_size=batch_size)
    return {
        "ppl_dense": ppl_dense, "eval_tokens": int(eval_windows.size),
        "mlp_curve": mlp_curve, "mlp_curve_layer0_dense": mlp_curve_l0, "head_curve": head_curve,
        "mlp_density_1pct": loss_threshold_density(mlp_curve, ppl_dense, 0.01),
        "mlp_density_2pct": loss_threshold_density(mlp_curve, ppl_dense, 0.02),
        "mlp_density_1pct_layer0_dense": loss_threshold_density(mlp_curve_l0, ppl_dense, 0.01),
        "head_keep_1pct": loss_threshold_density(head_curve, ppl_dense, 0.01),
        "sparsity": sparsity_stats(acts, max_positions),
        "heads": head_importance(acts, max_positions),
        "cosine": lookahead_cosine(acts, max_positions),
    }


def write_oracle(report: dict, out_dir: str | Path) -> list[Path]:
    """oracle.json and the oracle plots under ``out_dir``. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oracle.json").write_text(json.dumps(report, indent=1))
    return [out / "oracle.json"] + plots.oracle_plots(report, out)


# ---- CLI ---------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register ``dejavu analyze``."""
    from dejavu_jax.predictors import cli as _cli

    p = subparsers.add_parser("analyze", help="oracle sparsity analysis of a model (plots + oracle.json)",
                              description=__doc__.split("\n\n")[0])
    _cli.add_model_args(p)
    p.add_argument("--activations", required=True, help="collection directory (dejavu collect)")
    p.add_argument("--eval-tokens", required=True, help="held-out token stream for perplexity (.npy or text)")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results")
    p.set_defaults(func=run_analyze_cli)


def run_analyze_cli(args) -> dict:
    from dejavu_jax.predictors import cli as _cli
    from dejavu_jax.predictors.tokens import load_token_stream, windows

    model = _cli.load_model(args.model, args.dtype)
    stream = load_token_stream(args.eval_tokens, tokenizer_dir=_cli.tokenizer_dir(None, model),
                               max_tokens=args.eval_windows * args.seq_len)
    n = min(args.eval_windows, len(stream) // (args.seq_len - 1))
    report = oracle_analysis(model, args.activations, windows(stream, range(n), args.seq_len, True))
    for f in write_oracle(report, args.out):
        print("wrote", f)
    return report
