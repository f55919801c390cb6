"""``dejavu eval``: perplexity of an OPT model on WikiText-2 test (and the held-out books),
ours and optionally Hugging Face torch's on the same checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF OPT dir or orbax checkpoint (default: the reference model)")
    p.add_argument("--wikitext", help="raw WikiText-2 test file (default: data/wikitext2/wiki.test.raw)")
    p.add_argument("--corpus", help="corpus dir with heldout.txt.xz: also held-out perplexity")
    p.add_argument("--heldout-max-tokens", type=int, default=None,
                   help="score only the first N held-out tokens")
    p.add_argument("--wikitext-max-tokens", type=int, default=None,
                   help="score only the first N WikiText-2 tokens (quick checks)")
    p.add_argument("--context", type=int, default=None, help="window length (default: the model's positions)")
    p.add_argument("--stride", type=int, default=None, help="window stride (default: context / 2)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    p.add_argument("--hf", action="store_true", help="also score with transformers (torch) and compare")
    p.add_argument("--json", help="write the results to this JSON file")


def run(args) -> dict:
    from dejavu_jax.cli import resolve_model_dir
    from dejavu_jax.eval.suite import evaluate

    results = evaluate(resolve_model_dir(args.model), wikitext=args.wikitext, corpus_dir=args.corpus,
                       heldout_max_tokens=args.heldout_max_tokens,
                       wikitext_max_tokens=args.wikitext_max_tokens, context=args.context,
                       stride=args.stride, dtype=args.dtype, hf=args.hf, batch_size=args.batch_size)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity on WikiText-2 test / held-out text",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    from dejavu_jax.errors import DejavuError

    parser = argparse.ArgumentParser(prog="dejavu eval", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except DejavuError as e:
        print(f"dejavu eval: error: {e}", file=sys.stderr)
        return 2
    return 0
