#!/usr/bin/env python3
"""Collect, analyze, train (rank sweep) and evaluate Deja Vu predictors for one model.

    PYTHONPATH=. python3 scripts/run_predictor_pipeline.py --model models/opt-gutenberg-6l \
        --corpus .carry/corpus --max-tokens 3000000 --results benchmarks/results

Token streams: --corpus DIR (train-*.txt.xz + heldout.txt.xz, tokenized as the reference
model's training cache), or --tokens / --heldout-tokens (.npy of ids, or text).

Writes benchmarks/results/{oracle,predictors}.json and their plots, and saves the lookahead
predictors (orbax) to <model>/predictors. Collection is resumable (--work). A thin CLI over
`dejavu_jax.predictors.pipeline.run_pipeline`; `--model random:tiny` runs it on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from dejavu_jax.predictors import cli as _cli
    from dejavu_jax.predictors.pipeline import run_pipeline
    from dejavu_jax.predictors.tokens import corpus_streams, load_token_stream
    from dejavu_jax.predictors.train import TrainSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _cli.add_model_args(p)
    p.add_argument("--corpus", default=None, help="corpus dir: train-*.txt.xz + heldout.txt.xz")
    p.add_argument("--tokens", default=None, help=".npy of token ids, or .txt / .txt.xz text")
    p.add_argument("--heldout-tokens", default=None, help="held-out stream (default: the tail of --tokens)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for text (default: the model dir)")
    p.add_argument("--max-tokens", type=int, default=3_000_000)
    p.add_argument("--heldout-max-tokens", type=int, default=200_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--positions-per-seq", type=int, default=32)
    p.add_argument("--collect-batch", type=int, default=16)
    p.add_argument("--ranks", default="32,64,128,256", help="comma-separated ranks to sweep")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--recall-target", type=float, default=0.99)
    p.add_argument("--calibrate-on", default="active", choices=["active", "mass"])
    p.add_argument("--block-size", type=int, default=None, help="mlp_k granularity (default: min(128, F/32))")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows for perplexity")
    p.add_argument("--work", default="runs/predictors", help="activations and scratch (resumable)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--predictors-out", default=None, help="default: <model>/predictors")
    p.add_argument("--skip-same-layer", action="store_true", help="skip the same-layer comparison")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    t0 = time.time()
    if (args.corpus is None) == (args.tokens is None):
        p.error("pass exactly one of --corpus and --tokens")
    model = _cli.load_model(args.model, args.dtype)
    tok_dir = _cli.tokenizer_dir(args.tokenizer, model)
    if args.corpus:
        train, held = corpus_streams(args.corpus, tok_dir, args.max_tokens, args.heldout_max_tokens)
    else:
        train = load_token_stream(args.tokens, tokenizer_dir=tok_dir, max_tokens=args.max_tokens)
        held = None
        if args.heldout_tokens:
            held = load_token_stream(args.heldout_tokens, tokenizer_dir=tok_dir, max_tokens=args.heldout_max_tokens)
    print(f"model {args.model}: {model.config.num_hidden_layers} layers, d={model.config.hidden_size}, "
          f"F={model.config.ffn_dim}; {len(train)} train tokens, {None if held is None else len(held)} held-out "
          f"(loaded in {time.time() - t0:.1f}s)", flush=True)
    settings = TrainSettings(max_epochs=args.epochs, batch_size=args.batch_size, recall_target=args.recall_target,
                             calibrate_on=args.calibrate_on, block_size=args.block_size)
    result = run_pipeline(model, train, args.work, args.results, heldout_stream=held,
                          ranks=tuple(int(r) for r in args.ranks.split(",")), max_tokens=args.max_tokens,
                          heldout_max_tokens=args.heldout_max_tokens, seq_len=args.seq_len,
                          positions_per_seq=args.positions_per_seq, collect_batch=args.collect_batch,
                          eval_windows=args.eval_windows, settings=settings, predictors_out=args.predictors_out,
                          skip_same_layer=args.skip_same_layer, progress=not args.no_progress)
    print(table(result))
    print(json.dumps({"rank": result["rank"], "summary": result["summary"], "ppl": result["ppl"],
                      "targets": result["targets"], "timings_s": result["timings_s"]}, indent=1))
    return 0


def table(result: dict) -> str:
    rows = ["layer  mlp_k  density  recall  mass_rec  oracle_mass  head_k  head_rec  bytes_frac"]
    for r in result["layers"]:
        rows.append(f"{r['layer']:5d}  {r['mlp_k']:5d}  {r['mlp_density']:7.3f}  {r['mlp_recall']:6.3f}  "
                    f"{r['mlp_mass_recall']:8.3f}  {r['oracle_mass_recall']:11.3f}  {r['head_k']:6d}  "
                    f"{r['head_recall']:8.3f}  {r['predictor_bytes_frac']:10.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
