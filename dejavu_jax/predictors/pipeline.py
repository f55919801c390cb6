"""The whole predictor pipeline in one call: collect, analyze, sweep ranks, train, evaluate, save.

`run_pipeline` is what ``scripts/run_predictor_pipeline.py`` runs on the reference model:

1. collect activations (train + held-out; resumable) into ``<work>/activations``;
2. oracle analysis -> ``<results>/oracle.json`` + ``oracle_*.png``;
3. rank sweep of lookahead predictors; the rank rule (`train.choose_rank`) picks r;
4. same-layer predictors at that rank, for the lookahead comparison;
5. held-out evaluation of both, mask-only perplexity with the predictors' own selections;
6. the lookahead predictors saved (orbax) to ``<model dir>/predictors`` (or ``predictors_out``),
   ``<results>/predictors.json`` and ``predictors_*.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from dejavu_jax.config import preset
from dejavu_jax.model import OPTModel
from dejavu_jax.predictors import analysis as A
from dejavu_jax.predictors import metrics as MT
from dejavu_jax.predictors import plots
from dejavu_jax.predictors import tokens as TK
from dejavu_jax.predictors.collect import collect_activations
from dejavu_jax.predictors.evaluate import evaluate_predictors, mass_recall_at_density, summarize
from dejavu_jax.predictors.masked_eval import perplexity
from dejavu_jax.predictors.modules import config_fingerprint
from dejavu_jax.predictors.saving import save_predictors
from dejavu_jax.predictors.shards import ActivationSet
from dejavu_jax.predictors.train import (TrainSettings, choose_rank, fit_predictors, mean_needed_density,
                                         rank_for_width)

PAPER_SHAPES = ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "opt-175b")


def _environment() -> dict:
    try:
        from dejavu_jax.bench import environment

        return environment()
    except Exception:  # noqa: BLE001 - facts for the record only
        import jax

        return {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__, "commit": "unknown"}


def _eval_windows(meta: dict, streams: dict, n: int) -> np.ndarray:
    """``n`` windows of the held-out split (as the collection cut them), evenly spaced over it
    so that every held-out book counts (a book's first window, e.g. a title page of spaces,
    is far easier than its text)."""
    src, (start, stop) = meta["splits"]["heldout"]["stream"], meta["splits"]["heldout"]["windows"]
    return TK.windows(streams[src], TK.spaced_indices(start, stop, n), meta["seq_len"], meta["prepend_bos"], meta["config"]["bos_token_id"])


def _strip(report: dict) -> dict:
    """A fit report without the bulky curves (for JSON)."""
    out = {k: v for k, v in report.items() if k != "layers"}
    out["layers"] = [{k: v for k, v in r.items() if not k.endswith("curves")} for r in report["layers"]]
    return out


def paper_shape_costs(rank: int, hidden_size: int, cap: float = 0.1) -> list[dict]:
    """What the rank rule gives at the public OPT shapes, and what it costs."""
    out = []
    for name in PAPER_SHAPES:
        cfg = preset(name)
        r = rank_for_width(cfg.hidden_size, rank / hidden_size, cap=cap)
        rh = min(r, cfg.num_attention_heads)
        out.append({"model": name, "hidden_size": cfg.hidden_size, "rank": r, "head_rank": rh,
                    **{f"predictor_{k}": v for k, v in MT.cost_fractions(cfg, r, rh).items()}})
    return out


def run_pipeline(model: OPTModel, train_stream, out_work: str | Path, results_dir: str | Path, *,
                 heldout_stream=None, ranks=(32, 64, 128, 256), max_tokens: int | None = None,
                 heldout_max_tokens: int | None = None, seq_len: int = 512, positions_per_seq: int = 32,
                 collect_batch: int = 16, eval_windows: int = 64, settings: TrainSettings = TrainSettings(),
                 predictors_out: str | Path | None = None, skip_same_layer: bool = False,
                 progress: bool = True) -> dict:
    """Run every step of the module docstring; returns what predictors.json holds."""
    t0 = time.time()
    timings = {}
    work, results = Path(out_work), Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    cfg = model.config

    info = collect_activations(model, train_stream, work / "activations", positions_per_seq=positions_per_seq,
                               seq_len=seq_len, max_tokens=max_tokens, heldout_stream=heldout_stream,
                               heldout_max_tokens=heldout_max_tokens, batch_size=collect_batch, progress=progress)
    timings["collect"] = time.time() - t0
    streams = {"stream": np.asarray(train_stream[:max_tokens] if max_tokens else train_stream),
               "heldout_stream": None if heldout_stream is None else np.asarray(heldout_stream)}
    windows = _eval_windows(info, streams, eval_windows)
    train_set = ActivationSet(work / "activations", "train")
    held_set = ActivationSet(work / "activations", "heldout")

    t = time.time()
    oracle = A.oracle_analysis(model, held_set, windows)
    A.write_oracle(oracle, results)
    timings["oracle"] = time.time() - t

    t = time.time()
    sweep, fits = [], {}
    for r in ranks:
        pred, rep = fit_predictors(model, train_set, dataclasses.replace(settings, rank=r, lookahead=True),
                                   progress=progress)
        fits[r] = (pred, rep)
        cost = MT.cost_fractions(cfg, pred.rank, pred.head_rank)
        sweep.append({"rank": r, "mean_needed_density": mean_needed_density(rep, settings.recall_target,
                                                                             settings.calibrate_on),
                      "mean_mlp_k_density": float(np.mean(pred.mlp_density)), "head_k": list(pred.head_k),
                      "train_seconds": rep["seconds"], **cost})
    rank = choose_rank(sweep)
    pred, fit_report = fits[rank]
    timings["train_sweep"] = time.time() - t

    t = time.time()
    ev = evaluate_predictors(pred, held_set, cfg, head_label_frac=settings.head_label_frac)
    for rec, tr in zip(ev["layers"], fit_report["layers"]):  # both calibrations (on validation data)
        rec["mlp_k_active_target"], rec["mlp_k_mass_target"] = tr["mlp_k_active_target"], tr["mlp_k_mass_target"]
    same, same_ev, same_report = None, None, None
    if not skip_same_layer:
        same, same_report = fit_predictors(model, train_set, dataclasses.replace(settings, rank=rank, lookahead=False),
                                           progress=progress)
        same_ev = evaluate_predictors(same, held_set, cfg, head_label_frac=settings.head_label_frac)
    timings["train_same_layer_and_eval"] = time.time() - t

    t = time.time()
    ppl = {"dense": oracle["ppl_dense"],
           "lookahead_calibrated": perplexity(model, windows, mode="predictor", predictors=pred),
           "lookahead_calibrated_mlp_only": perplexity(model, windows, mode="predictor", predictors=pred,
                                                       head_k=cfg.num_attention_heads),
           "lookahead_calibrated_heads_only": perplexity(model, windows, mode="predictor", predictors=pred,
                                                         mlp_k=cfg.ffn_dim)}
    if same is not None:
        ppl["same_layer_calibrated"] = perplexity(model, windows, mode="predictor", predictors=same)
    F, H, L = cfg.ffn_dim, cfg.num_attention_heads, cfg.num_hidden_layers
    pred_curve = [{"density": p["density"], "k": p["k"],
                   "ppl": perplexity(model, windows, mode="predictor", predictors=pred, mlp_k=p["k"], head_k=H)}
                  for p in oracle["mlp_curve"]]
    pred_curve_l0 = [{"density": p["density"], "k": p["k"],
                      "ppl": perplexity(model, windows, mode="predictor", predictors=pred, head_k=H,
                                        mlp_k=(F,) + (p["k"],) * (L - 1))} for p in oracle["mlp_curve"]]
    timings["perplexity"] = time.time() - t

    d1 = oracle["mlp_density_1pct"]
    at_1pct = mass_recall_at_density(ev["curves"], d1) if d1 else None
    d1_l0 = oracle["mlp_density_1pct_layer0_dense"]
    at_1pct_l0 = mass_recall_at_density(ev["curves"], d1_l0) if d1_l0 else None
    paper = paper_shape_costs(rank, cfg.hidden_size)
    out_path = Path(predictors_out) if predictors_out else (Path(model.source) / "predictors" if model.source
                                                            else work / "predictors")
    gap = None
    if same_ev is not None:
        gap = [{"layer": a["layer"], "mlp_recall_lookahead": a["mlp_recall"],
                "mlp_recall_same_layer_at_same_k": _recall_at_k(same_ev, a["layer"], a["mlp_k"]),
                "mlp_density_lookahead": a["mlp_density"], "mlp_density_same_layer": b["mlp_density"],
                "head_recall_lookahead": a["head_recall"],
                "head_recall_same_layer_at_same_k": _head_recall_at_k(same_ev, a["layer"], a["head_k"])}
               for a, b in zip(ev["layers"], same_ev["layers"])]
        for g, b in zip(gap, same_ev["layers"]):
            l, kb = g["layer"], b["mlp_k"]
            g["mlp_gap_points"] = 100 * (g["mlp_recall_same_layer_at_same_k"] - g["mlp_recall_lookahead"])
            g["head_gap_points"] = 100 * (g["head_recall_same_layer_at_same_k"] - g["head_recall_lookahead"])
            # the same comparison at the same-layer predictor's own (smaller) calibrated k, and at 10%
            g["mlp_gap_points_at_same_layer_k"] = 100 * (_recall_at_k(same_ev, l, kb) - _recall_at_k(ev, l, kb))
            k10 = max(1, round(0.1 * cfg.ffn_dim))
            g["mlp_gap_points_at_density_0.1"] = 100 * (_recall_at_k(same_ev, l, k10) - _recall_at_k(ev, l, k10))
            g["mass_gap_points_at_density_0.1"] = 100 * (b["mass_recall_at"]["0.1"] -
                                                         ev["layers"][l]["mass_recall_at"]["0.1"])
    opt13 = next(p for p in paper if p["model"] == "opt-13b")
    result = {
        **_environment(), "model": str(model.source or "random"), "config_fingerprint": config_fingerprint(cfg),
        "config": cfg.to_hf_dict(), "model_dtype": str(model.dtype),
        "rank": rank, "head_rank": pred.head_rank, "block_size": pred.block_size, "lookahead": True,
        "recall_target": settings.recall_target, "calibrate_on": settings.calibrate_on,
        "head_recall_target": settings.head_recall_target, "head_calibrate_on": settings.head_calibrate_on, "head_label_k": fit_report["label_k"],
        "rank_rule": ("smallest swept rank whose MLP density needed for the recall target (validation, mean over "
                      "layers 1..) is within 5% of the best rank's; other widths: r = (r*/d*) * d rounded up to 64, capped at "
                      "0.1 d; head predictor rank min(r, H)"),
        "layers": ev["layers"], "summary": summarize(ev["layers"]),
        "same_layer": None if same_ev is None else same_ev["layers"],
        "same_layer_summary": None if same_ev is None else summarize(same_ev["layers"]),
        "lookahead_gap": gap,
        "oracle": {k: oracle[k] for k in ("ppl_dense", "mlp_curve", "mlp_curve_layer0_dense", "head_curve",
                                          "mlp_density_1pct", "mlp_density_2pct", "mlp_density_1pct_layer0_dense",
                                          "head_keep_1pct")},
        "oracle_curve": [{"density": p["density"], "ppl": p["ppl"]} for p in oracle["mlp_curve"]],
        "predictor_curve": pred_curve, "predictor_curve_layer0_dense": pred_curve_l0, "ppl": ppl,
        "mass_recall_at_oracle_1pct_density": at_1pct,
        "mass_recall_at_oracle_1pct_density_layer0_dense": at_1pct_l0,
        "rank_sweep": sweep, "paper_shapes": paper,
        "targets": {
            "mass_recall_ge_0.95_at_oracle_1pct_excl_layer0": None if at_1pct is None else bool(min(at_1pct[1:] or at_1pct) >= 0.95),
            "predictor_bytes_frac_opt13b": opt13["predictor_bytes_frac"],
            "predictor_bytes_le_10pct_opt13b": bool(opt13["predictor_bytes_frac"] <= 0.10),
            "max_lookahead_gap_points": None if gap is None else max(max(g["mlp_gap_points"] for g in gap[1:] or gap), 0.0),
            "max_lookahead_gap_points_at_density_0.1": None if gap is None else max(
                max(g["mlp_gap_points_at_density_0.1"] for g in gap[1:] or gap), 0.0),
        },
        "collection": {"positions": info["positions"], "seq_len": seq_len, "positions_per_seq": positions_per_seq},
        "training": _strip(fit_report), "training_same_layer": None if same_report is None else _strip(same_report),
        "predictors_path": str(out_path), "timings_s": timings,
    }
    save_predictors(pred, out_path, cfg, summary={"summary": result["summary"], "rank": rank, "ppl": ppl})
    result["timings_s"]["total"] = time.time() - t0
    (results / "predictors.json").write_text(json.dumps(result, indent=1, default=_json_default))
    plots.predictor_plots(ev, results, same_layer=same_ev, sweep=sweep,
                          ppl_curves={"dense": oracle["ppl_dense"], "oracle (all layers)": oracle["mlp_curve"],
                                      "oracle (layer 0 dense)": oracle["mlp_curve_layer0_dense"],
                                      "lookahead predictor": pred_curve,
                                      "lookahead predictor (layer 0 dense)": pred_curve_l0})
    return result


def _recall_at_k(evaluation: dict, layer: int, k: int) -> float:
    return MT.value_at(evaluation["curves"][layer]["mlp"]["active_recall"], k)


def _head_recall_at_k(evaluation: dict, layer: int, k: int) -> float:
    return MT.value_at(evaluation["curves"][layer]["heads"]["label_recall"], k)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON-able: {type(o)}")
