"""Render README's results tables from the committed JSON under benchmarks/results/.

Replaces the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers,
so the numbers in README always come from a benchmark file (never typed by hand).

    python scripts/update_readme_results.py
"""

from __future__ import annotations

import json
from collections import Counter
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def _load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def decode_table() -> str:
    recs = _load("decode.json")
    if not recs:
        return "_not measured yet_"
    ok = [r for r in recs if "error" not in r]

    def ratio(r, impl):
        """dense tokens/s over ``impl``'s, both from the same run (same measured peak)."""
        peer = [x for x in ok if x["impl"] == impl and x["model"] == r["model"] and x["batch"] == r["batch"]
                and x.get("peak_GBps") == r.get("peak_GBps")]
        return f"{r['tokens_per_s'] / peer[0]['tokens_per_s']:.2f}" if r["impl"] == "dense" and peer else ""

    rows = ["| model | batch | impl | ms/token | tokens/s | GB/s | of peak BW | peak GB/s (same run) "
            "| dense x HF eager | dense x HF static | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        rows.append(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ms_per_token']:.2f} | "
                    f"{r['tokens_per_s']:.1f} | {r['achieved_GBps']:.0f} | {r['frac_of_peak_bw']:.2f} | "
                    f"{r['peak_GBps']:.0f} | {ratio(r, 'hf_torch')} | {ratio(r, 'hf_torch_static')} | "
                    f"{r['commit'][:7]} |")
    r0 = ok[0]
    rows.append(f"\n{r0['device']}, jax {r0['jax_version']}; peak read bandwidth = best bf16 GEMV over 4 GiB in "
                f"the same run (a fraction above 1 means the decode loop streamed faster than that GEMV); "
                f"prompt {r0['prompt_len']}, {r0['new_tokens']} new tokens, random bf16 weights. Ratios only "
                "between records of one run.")
    return "\n".join(rows)


def sparse_table() -> str:
    from dejavu_jax.bench_sparse import model_size, variant

    recs = _load("sparse_decode.json")
    if not recs:
        return "_not measured yet_"
    ok = [r for r in recs if "ms_per_token" in r and "invalid" not in r]
    # the latest record of each setting (the JSON keeps every run)
    latest = {(r["model"], r["batch"], r["impl"], r["mlp_density"], r["head_keep"],
               variant(r) if r["impl"] == "sparse" else r.get("xla_flags", "")): r for r in ok}
    order = {"dense": 0, "hf_torch": 1, "sparse": 2}
    ok = sorted(latest.values(), key=lambda r: (model_size(r["model"]), r["batch"], order.get(r["impl"], 3),
                                                -r["mlp_density"], -r["head_keep"], variant(r)))
    rows = ["| model | batch | impl | MLP density (used) | heads kept (used) | variant | ms/token | x dense "
            "| x HF eager | GPU kernel ms/token | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        hf = f"{r['speedup_vs_hf_torch']:.2f}" if "speedup_vs_hf_torch" in r else ""
        used = (f" ({r['used_mlp_density']:.2f})", f" ({r['used_head_density']:.2f})") if "used_mlp_density" in r \
            else ("", "")
        kern = f"{r['profile']['kernel_ms_per_token']:.2f}" if "profile" in r else ""
        var = variant(r) if r["impl"] == "sparse" else ("XLA flags" if r.get("xla_flags") else "")
        rows.append(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['mlp_density']:.2f}{used[0]} | "
                    f"{r['head_keep']:.2f}{used[1]} | {var} | {r['ms_per_token']:.2f} | "
                    f"{r.get('speedup_vs_dense', 1):.2f} | {hf} | {kern} | {r['commit'][:7]} |")
    bad = [r for r in recs if "error" in r and "skipped" not in str(r["error"])]
    r0 = ok[0]
    counts = Counter(r["new_tokens"] for r in ok)
    new = f"{counts.most_common(1)[0][0]} new tokens" + "".join(
        f" ({n} in {c} rows: the records' new_tokens)" for n, c in counts.most_common()[1:])
    rows.append(f"\n{r0['device']}, jax {r0['jax_version']}; ratios within one run (one commit); random bf16 weights and "
                f"random predictors of the right shapes (densities forced), prompt {r0['prompt_len']}, "
                f"{new}. Variant: default = lookahead predictors, exact top-k, K/V of "
                "every head (kv=all), kernels picked by `impl=\"auto\"`; `sel=threshold` = the MLP set is "
                "the scores above a threshold calibrated to keep the MLP density on average (found by compaction, "
                "no sort; the density used in brackets); `in-layer` = predictors fed the "
                "layer's own input; `kv=selected` = K/V only for the selected heads; `stream` = the lookahead "
                "sets on a second GPU stream (`predictor_stream=True`); `sets=unfused` = batch-1 threshold sets "
                "from XLA ops instead of `predict_sets`; `glue=unfused` = the layer boundaries as XLA ops instead "
                "of the fused kernels (`add_layer_norm`, q + K/V into the cache); `flags` = the record's `xla_flags` (XLA "
                f"command buffers around while loops, or the latency-hiding scheduler); `per_row` = each row masked "
                "to its own sets inside the union (`batch_mode=\"per_row\"`); `combine=out_proj` = the "
                "attention's split outputs combined inside the out-projection kernel (measured slower; off); "
                "`hidden=unfused` / `scatter=unfused` = a threshold's predictor hidden / MLP-set scatter in "
                "`predict_sets`' own kernels instead of on extra programs of the q + K/V launches (the default since "
                "0205614); `scores=out_proj` = the scores on extra programs of the out-projection launch instead "
                "of their own kernel (measured slower; off; records of 0205614 relabelled, see their `relabelled` "
                "field); `EXTRA_PROGRAMS_FIRST=True` / `False` = those hosted programs first / last in the q + K/V "
                "launch's grid (a module constant the run set; first is the default since 6b68ea0's run); "
                "`OUT_PROGRAMS_PER_SM=N` = the out-projection's rows split for about N programs an SM (2, the "
                "default, was faster); `SCORES_IN_ATTENTION=False` = the scores in their own kernel instead of "
                "on extra programs of the attention's launch (the default since cd5dc23's run); `MAX_SEQ_SPLITS=1` = "
                "the attention in one split, normalized in-kernel (no combine kernel; measured slower); the boundary "
                "kernels summing the partials (`SUMS_IN_BOUNDARY`, off) are in "
                "`benchmarks/results/boundary_sums.json`. "
                "Rows: the latest run of each setting "
                f"({len(ok)} of {len(recs)} records; every run is in `benchmarks/results/sparse_decode.json`). "
                f"Failed settings: {len(bad)} (see the JSON).")
    return "\n".join(rows)


def reference_table() -> str:
    r = _load("reference_model.json")
    if not r:
        return "_not trained yet_"
    keys = ["params", "d_model", "n_layers", "tokens_seen", "train_loss", "heldout_ppl", "wikitext2_ppl",
            "hf_wikitext2_ppl", "unigram_wikitext2_ppl", "device", "commit"]
    rows = ["| figure | value |", "|---|---|"]
    for k in keys:
        if k in r:
            v = r[k]
            rows.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def predictors_table() -> str:
    r = _load("predictors.json")
    if not r:
        return "_not trained yet_"
    at1 = r.get("mass_recall_at_oracle_1pct_density") or []
    gap = {g["layer"]: g for g in r.get("lookahead_gap") or []}
    rows = ["| layer | mlp_k | MLP density | recall (active) | mass recall | mass recall at oracle 1% density "
            "| heads kept | head recall | lookahead gap (points, same k) |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["layers"]:
        g = gap.get(x["layer"], {})
        m1 = f"{at1[x['layer']]:.3f}" if x["layer"] < len(at1) else ""
        rows.append(f"| {x['layer']} | {x['mlp_k']} | {x['mlp_density']:.3f} | {x['mlp_recall']:.3f} | "
                    f"{x['mlp_mass_recall']:.3f} | {m1} | {x['head_k']} | {x['head_recall']:.3f} | "
                    f"{g.get('mlp_gap_points', float('nan')):.2f} |")
    t, o, ppl = r["targets"], r["oracle"], r["ppl"]
    rows.append(f"\nRank {r['rank']} (sweep {[s['rank'] for s in r['rank_sweep']]}); calibrated to "
                f"{r['recall_target']} recall of active neurons, blocks of {r['block_size']}. Oracle: <= 1% "
                f"perplexity loss needs MLP density {o['mlp_density_1pct']} in every layer "
                f"({o['mlp_density_1pct_layer0_dense']} with layer 0 dense). Held-out perplexity: dense "
                f"{ppl['dense']:.2f}, with the predictors' sets {ppl['lookahead_calibrated']:.2f} (lookahead), "
                f"{ppl.get('same_layer_calibrated', float('nan')):.2f} (same-layer). Predictor bytes at the "
                f"OPT-13B shape: {t['predictor_bytes_frac_opt13b']:.3f} of a layer. {r['device']}, commit "
                f"{str(r['commit'])[:7]}.")
    return "\n".join(rows)


def quality_table() -> str:
    r = _load("sparse_quality.json")
    if not r:
        return "_not measured yet_"
    rows = ["| text | MLP density | heads kept | K/V | dense layers | ppl dense | ppl sparse | change "
            "| greedy agreement | bytes read |", "|---|---|---|---|---|---|---|---|---|---|"]
    calibrated = "calibrated"
    for x in r["records"]:
        show = (x["head_keep"] in (None, 1.0) or x["kv_policy"] == "selected" or x["dense_layers"]
                or (x["mlp_density"] == 0.1 and x["head_keep"] in (0.5, 0.75)))
        if not show:
            continue
        mlp = x["mlp_density"] or calibrated
        if x.get("mlp_threshold") is not None:  # a threshold's density is what it used
            mlp = f"threshold {x['mlp_threshold']:g} ({x['used_mlp_density']:.3f})"
        rows.append(f"| {x['text']} | {mlp} | {x['head_keep'] or calibrated} | "
                    f"{x['kv_policy']} | {x['dense_layers'] or ''} | {x['ppl_dense']:.2f} | {x['ppl_sparse']:.2f} | "
                    f"{100 * x['rel_increase']:+.2f}% | {x['greedy_agreement']:.3f} | {x['bytes_fraction']:.3f} |")
    rows.append("\n" + "\n".join(f"- **{k}**: {v}" for k, v in r["summary"].items()
                                   if k not in ("meaningful_text",)))
    rows.append(f"\nRows shown: head fractions 1.0 and the calibrated sets, plus a few sparser points; "
                f"all {len(r['records'])} records are in `benchmarks/results/sparse_quality.json`. "
                f"{', '.join(sorted({x.get('device', r['device']) for x in r['records']}))}, f32 weights; "
                "an MLP threshold keeps the neurons whose predictor logit exceeds it (the density it used in "
                "brackets).")
    return "\n".join(rows)


def union_table() -> str:
    r = _load("union_density.json")
    if not r:
        return "_not measured yet_"
    recs = r["records"]
    batches = sorted({x["batch"] for x in recs})
    keys = list(dict.fromkeys((x["mlp_density"], x["head_keep"]) for x in recs))
    rows = ["| per-row setting | " + " | ".join(f"B={b}" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for key in keys:
        label = "calibrated sets" if key == (None, None) else f"MLP {key[0]}, heads {key[1]}"
        cells = []
        for b in batches:
            x = next(x for x in recs if (x["mlp_density"], x["head_keep"]) == key and x["batch"] == b)
            cells.append(f"{x['mean_union_mlp_density']:.2f} / {x['mean_union_head_density']:.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append(f"\nMLP / head density of the union of the rows' predicted sets (mean over layers and "
                f"{recs[0]['new_tokens']} decode steps). Each row is a prompt from a different held-out book. "
                "Densities do not depend on the device (measured on a CPU).")
    return "\n".join(rows)


TABLES = {"union": union_table, "decode": decode_table, "sparse": sparse_table, "reference": reference_table,
          "predictors": predictors_table, "quality": quality_table}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
