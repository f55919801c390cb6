"""Render README's results tables from the committed JSON under benchmarks/results/.

Replaces the text between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers,
so the numbers in README always come from a benchmark file (never typed by hand).

    python scripts/update_readme_results.py
"""

from __future__ import annotations

import json
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
    rows = ["| model | batch | impl | ms/token | tokens/s | GB/s | of peak BW | dense x HF eager | dense x HF static |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        x1 = f"{r['speedup_vs_hf_torch']:.2f}" if "speedup_vs_hf_torch" in r else ""
        x2 = f"{r['speedup_vs_hf_torch_static']:.2f}" if "speedup_vs_hf_torch_static" in r else ""
        rows.append(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['ms_per_token']:.2f} | "
                    f"{r['tokens_per_s']:.1f} | {r['achieved_GBps']:.0f} | {r['frac_of_peak_bw']:.2f} | {x1} | {x2} |")
    r0 = ok[0]
    rows.append(f"\n{r0['device']}, jax {r0['jax_version']}, commit {r0['commit']}, peak read bandwidth "
                f"{r0['peak_GBps']:.0f} GB/s (bf16 GEMV over 4 GiB, same run); prompt {r0['prompt_len']}, "
                f"{r0['new_tokens']} new tokens, random bf16 weights.")
    return "\n".join(rows)


def sparse_table() -> str:
    from dejavu_jax.bench_sparse import variant

    recs = _load("sparse_decode.json")
    if not recs:
        return "_not measured yet_"
    ok = [r for r in recs if "ms_per_token" in r and "invalid" not in r]
    rows = ["| model | batch | impl | MLP density (used) | heads kept (used) | variant | ms/token | x dense "
            "| x HF eager | GPU kernel ms/token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        hf = f"{r['speedup_vs_hf_torch']:.2f}" if "speedup_vs_hf_torch" in r else ""
        used = (f" ({r['used_mlp_density']:.2f})", f" ({r['used_head_density']:.2f})") if "used_mlp_density" in r \
            else ("", "")
        kern = f"{r['profile']['kernel_ms_per_token']:.2f}" if "profile" in r else ""
        var = variant(r) if r["impl"] == "sparse" else ("XLA flags" if r.get("xla_flags") else "")
        rows.append(f"| {r['model']} | {r['batch']} | {r['impl']} | {r['mlp_density']:.2f}{used[0]} | "
                    f"{r['head_keep']:.2f}{used[1]} | {var} | {r['ms_per_token']:.2f} | "
                    f"{r.get('speedup_vs_dense', 1):.2f} | {hf} | {kern} |")
    bad = [r for r in recs if "error" in r and "skipped" not in str(r["error"])]
    r0 = ok[0]
    rows.append(f"\n{r0['device']}, jax {r0['jax_version']}, commit {r0['commit']}; random bf16 weights and "
                f"random predictors of the right shapes (densities forced), prompt {r0['prompt_len']}, "
                f"{r0['new_tokens']} new tokens. Variant: default = lookahead predictors, exact top-k, K/V of "
                "every head (kv=all), kernels picked by `impl=\"auto\"`; `in-layer` = predictors fed the "
                "layer's own input; `kv=selected` = K/V only for the selected heads; `flags` = XLA command "
                f"buffers around while loops. Failed settings: {len(bad)} (see the JSON).")
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


TABLES = {"decode": decode_table, "sparse": sparse_table, "reference": reference_table}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, fn in TABLES.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
