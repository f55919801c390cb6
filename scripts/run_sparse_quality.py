#!/usr/bin/env python3
"""Sparse-decoding quality sweep on the reference model (issue 7, item 7).

    python scripts/run_sparse_quality.py --model models/opt-gutenberg-6l \
        --text heldout=.carry/corpus/heldout.txt.xz --text wikitext2=data/wikitext2/wiki.test.raw

For each text: evenly spaced windows, teacher-forced perplexity through the real decode
steps (`dejavu_jax.sparse_quality.sweep`: dense prefill of ``--prefix`` tokens, then one
sparse step per token) and greedy-continuation agreement with dense, over a grid of MLP
densities x head fractions (K/V policy "all"), plus ``--selected`` points with K/V policy
"selected". Writes ``<out>/sparse_quality.json`` ({"summary", "speed", "texts", "records"};
each record carries its "text") and ``<out>/sparse_quality.png`` (one panel per text).

A text is ``NAME=PATH``: WikiText-2's raw test file (the usual recipe's text), a ``.txt`` /
``.txt.xz`` corpus file (documents tokenized as the training cache), or a ``.npy`` of ids.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path


def grid(densities, head_keeps, selected) -> list[dict]:
    out = [dict(mlp_density=m, head_keep=h, kv_policy="all") for m, h in itertools.product(densities, head_keeps)]
    return out + [dict(mlp_density=m, head_keep=h, kv_policy="selected") for m, h in selected]


def describe(best: dict, limit: str, ppl_dense: float) -> str:
    r = best[limit]
    if r is None:
        return f"no setting of the grid stays within {limit} of dense perplexity ({ppl_dense:.2f})"
    calibrated = "(the predictors' calibrated k)"
    dense = f", dense_layers={r['dense_layers']}" if r.get("dense_layers") else ""
    mlp = f"mlp_density={r['mlp_density'] or calibrated}"
    if r.get("mlp_threshold") is not None:
        mlp = f"mlp_threshold={r['mlp_threshold']} (MLP density used {r['used_mlp_density']:.3f})"
    return (f"{limit}: {mlp}, head_keep={r['head_keep'] or calibrated}, "
            f"kv_policy={r['kv_policy']}{dense} "
            f"(ppl {r['ppl_sparse']:.3f} vs dense {r['ppl_dense']:.3f}, {100 * r['rel_increase']:+.2f}%; greedy "
            f"agreement {r['greedy_agreement']:.3f}; {r['bytes_fraction']:.3f} of the layer weight bytes read)")


BEST_FIELDS = ("mlp_density", "mlp_threshold", "used_mlp_density", "head_keep", "kv_policy", "ppl_sparse",
               "rel_increase", "greedy_agreement", "bytes_fraction")


def best_fields(recs: list[dict]) -> dict:
    """A text's "best" (the fewest bytes within 1% and 2% perplexity) and its summary line."""
    from dejavu_jax import sparse_quality as SQ

    best = SQ.best_settings(recs)
    ppl_dense = recs[0]["ppl_dense"]
    return {"best": {k: None if v is None else {f: v.get(f) for f in BEST_FIELDS} for k, v in best.items()},
            "summary": "; ".join(describe(best, k, ppl_dense) for k in best)}


def join_measured(records: list[dict], bench_json: Path, shape: str = "opt-13b") -> int:
    """Attach the GPU benchmark's batch-1 speed at ``shape`` to the records whose (mlp_density,
    head_keep, kv_policy) it measured (median over its runs). Returns how many got one."""
    import statistics

    if not bench_json.is_file():
        return 0
    rows = [r for r in json.loads(bench_json.read_text()) if r.get("model") == shape and r.get("batch") == 1
            and r.get("impl") in ("sparse", "dense")]
    joined = 0
    for rec in records:
        rec.pop(f"measured_{shape}_batch1", None)
        if rec.get("dense_layers"):  # the benchmark runs every layer sparse
            continue
        if rec.get("mlp_threshold") is None:  # top-k sets: the benchmark's forced densities
            same = [r for r in rows if r.get("selection", "top_k") != "threshold" and
                    (r["mlp_density"], r["head_keep"], r.get("kv_policy", "all")) ==
                    (rec["mlp_density"], rec["head_keep"], rec["kv_policy"])]
        else:  # a threshold: the benchmark's threshold calibrated to the density this one used
            same = [r for r in rows if r.get("selection") == "threshold" and r["head_keep"] == rec["head_keep"]
                    and r.get("kv_policy", "all") == rec["kv_policy"]
                    and abs(r["mlp_density"] - rec["used_mlp_density"]) <= 0.01]
        if same:
            rec[f"measured_{shape}_batch1"] = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in same),
                "speedup_vs_dense": statistics.median(r["speedup_vs_dense"] for r in same),
                "runs": len(same), "device": same[0].get("device"), "source": str(bench_json)}
            joined += 1
    return joined


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/opt-gutenberg-6l")
    p.add_argument("--predictors", default=None, help="default: <model>/predictors")
    p.add_argument("--text", action="append", default=None, help="NAME=PATH (repeatable); the first is the main one")
    p.add_argument("--windows", type=int, default=32, help="windows per text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prefix", type=int, default=1, help="dense-prefilled tokens of each window (not scored)")
    p.add_argument("--prompts", type=int, default=16, help="greedy prompts per text (the first windows' starts)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5,1.0")
    p.add_argument("--head-keeps", default="0.25,0.5,0.75,1.0")
    p.add_argument("--selected", default="0.1:0.5,0.2:0.75,0.3:1.0",
                   help="mlp_density:head_keep points also run with kv_policy='selected'")
    p.add_argument("--other-densities", default=None, help="grid for the texts after the first (default: --densities)")
    p.add_argument("--other-head-keeps", default=None, help="likewise for --head-keeps")
    p.add_argument("--other-selected", default=None, help="likewise for --selected")
    p.add_argument("--extra", default="[]",
                   help="JSON list of further SparsityConfig settings for every text, e.g. "
                        "'[{}, {\"dense_layers\": [0], \"mlp_density\": 0.1}]' ({}: the predictors' calibrated k)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="instead of running: merge sparse_quality.json files of runs over different texts into --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="model dtype (float32: the selection's effect alone, same numbers on CPU and GPU)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--bench", default="benchmarks/results/sparse_decode.json",
                   help="GPU benchmark records to join measured speed from (where the settings match)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), Path(args.bench))
    if not args.text:
        p.error("pass --text NAME=PATH (one or more), or --merge")

    import jax.numpy as jnp

    import dejavu_jax as dj
    from dejavu_jax import sparse_quality as SQ
    from dejavu_jax.bench import dump_json, environment
    from dejavu_jax.errors import InputError
    from dejavu_jax.predictors.tokens import text_windows

    t0 = time.time()
    model = dj.load_opt(args.model, dtype=jnp.dtype(args.dtype))
    pred = dj.load_predictors(args.predictors or str(Path(args.model) / "predictors"), model)
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    pts = lambda s: [tuple(float(v) for v in x.split(":")) for x in s.split(",") if x]  # noqa: E731
    settings = grid(floats(args.densities), floats(args.head_keeps), pts(args.selected))
    other = grid(floats(args.other_densities or args.densities), floats(args.other_head_keeps or args.head_keeps),
                 pts(args.selected if args.other_selected is None else args.other_selected))
    extra = json.loads(args.extra)
    settings, other = settings + extra, other + extra
    texts, records, timings = {}, [], {}
    for i, spec in enumerate(args.text):
        name, _, path = spec.partition("=")
        if not path:
            p.error(f"--text wants NAME=PATH, got {spec!r}")
        t = time.time()
        try:
            windows, n_tokens = text_windows(path, args.model, args.windows, args.seq_len, model.config.bos_token_id)
        except InputError as e:
            p.error(str(e))
        prompts = windows[:args.prompts, :args.prompt_len]
        # each record lands in <out>/partial_<name>/ as it completes (kept if the run is cut off)
        partial = Path(args.out) / f"partial_{name}"
        recs = SQ.sweep(model, pred, windows, prompts, settings if i == 0 else other, out_dir=partial,
                        max_new_tokens=args.max_new_tokens, progress=not args.no_progress, prefix=args.prefix)
        shutil.rmtree(partial, ignore_errors=True)
        for r in recs:
            r["text"] = name
        records += recs
        ppl_dense = recs[0]["ppl_dense"]
        texts[name] = {"path": path, "tokens": n_tokens, "windows": len(windows), "seq_len": args.seq_len,
                       "prefix": args.prefix, "prompts": len(prompts), "prompt_len": args.prompt_len,
                       "max_new_tokens": args.max_new_tokens, "ppl_dense": ppl_dense,
                       **best_fields(recs)}
        timings[name] = time.time() - t
        print(f"[{name}] dense ppl {ppl_dense:.3f}: {texts[name]['summary']} ({timings[name]:.0f}s)", flush=True)

    main_text = args.text[0].partition("=")[0]
    out = {
        "model": args.model, "predictors": args.predictors or str(Path(args.model) / "predictors"),
        "predictor_rank": pred.rank, "lookahead": pred.lookahead,
        "summary": {name: texts[name]["summary"] for name in texts} | {
            "meaningful_text": main_text,
            "note": (f"'{main_text}' is the meaningful figure: the model was trained on Gutenberg books, so "
                     "other text (WikiText-2: dense ppl in the thousands) is far out of its distribution and its "
                     "relative perplexity changes say little about the sparsity.")},
        "speed": {"tokens_per_s": None,
                  "axis": "bytes_speedup_bound = 1 / bytes_fraction: the share of the decoder layers' weight bytes "
                          "a sparse step reads (attention q/out of kept heads, K/V per kv_policy, MLP rows of kept "
                          "neurons; embeddings, LM head and predictors left out). A model estimate, not a "
                          "measurement: these runs were on a CPU. Measured speed comes from the GPU benchmark "
                          "(--bench, random weights at the OPT-13B shape): records whose (mlp_density, head_keep, "
                          "kv_policy) it ran carry 'measured_opt-13b_batch1'; the rest await that benchmark."},
        "grid": settings, "grid_other_texts": other, "texts": texts, "records": records, **environment(),
        "timings_s": timings | {"total": time.time() - t0},
    }
    for r in records:
        r["bytes_speedup_bound"] = 1.0 / r["bytes_fraction"]
    out["speed"]["joined_records"] = join_measured(records, Path(args.bench))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sparse_quality.json").write_text(dump_json(out))
    SQ.plot(records, Path(args.out) / "sparse_quality.png")
    print(json.dumps(out["summary"], indent=1))
    return 0


def merge(paths: list[str], out_dir: Path, bench_json: Path) -> int:
    """One sparse_quality.json (and plot) from runs of this script over different texts."""
    from dejavu_jax import sparse_quality as SQ
    from dejavu_jax.bench import dump_json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = dict(runs[0])
    for key in ("texts", "timings_s"):
        out[key] = {k: v for r in runs for k, v in r[key].items()}
    out["summary"] = {**{k: v for r in runs for k, v in r["summary"].items()}, **{
        k: runs[0]["summary"][k] for k in ("meaningful_text", "note")}}
    out["records"] = [dict(rec, device=rec.get("device", r.get("device"))) for r in runs for rec in r["records"]]
    for name, text in out["texts"].items():  # a text run more than once: best over all its records
        recs = [r for r in out["records"] if r.get("text") == name]
        if recs:
            text.update(best_fields(recs))
            out["summary"][name] = text["summary"]
    for key in ("grid", "grid_other_texts"):  # a run's grids: its records (each with its "text") say what ran
        out.pop(key, None)
    out["speed"]["joined_records"] = join_measured(out["records"], bench_json)
    out["merged_from"] = [str(p) for p in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sparse_quality.json").write_text(dump_json(out))
    SQ.plot(out["records"], out_dir / "sparse_quality.png")
    print(json.dumps(out["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
