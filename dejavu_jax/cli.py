"""The ``dejavu`` command line: convert, generate, bench, and the subcommands that other
modules register (eval, collect, analyze, train-predictors).

Each subcommand module exposes ``add_parser(subparsers)`` which adds its parser and sets
``func`` (called with the parsed args). Library errors (`DejavuError`) print as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from dejavu_jax.errors import DejavuError

# The model README's main job runs when no --model is given: the reference OPT trained on
# Project Gutenberg text (issue 5), committed under models/.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "opt-gutenberg-6l"

# Subcommands that live beside the code they drive.
EXTERNAL_SUBCOMMANDS = [
    "dejavu_jax.cli_convert",
    "dejavu_jax.eval.cli",
    "dejavu_jax.predictors.cli",
]


def _dtype(name: str):
    import jax.numpy as jnp

    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
    if name not in table:
        raise DejavuError(f"--dtype {name!r} is not supported; choose one of {sorted(table)}.")
    return table[name]


def resolve_model_dir(arg: str | None) -> Path:
    path = Path(arg) if arg else DEFAULT_MODEL
    if not path.exists():
        hint = ("the default reference model is committed under models/; run from a clone of the "
                "repository" if arg is None else "pass a Hugging Face OPT directory or an orbax "
                "checkpoint made by `dejavu convert`")
        raise DejavuError(f"model directory {path} does not exist: {hint}.")
    return path


# ---- generate -----------------------------------------------------------------------------------
def _cmd_generate(args) -> None:
    import numpy as np

    from dejavu_jax.checkpoint import load_opt
    from dejavu_jax.decode import dense_decode, generate, load_tokenizer

    model = load_opt(resolve_model_dir(args.model), dtype=_dtype(args.dtype))
    tok = load_tokenizer(model)
    prompts = args.prompt or ["The old man looked at the sea and"]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    runs = []
    if not args.sparse or args.compare:
        runs.append(("dense", dense_decode))
    if args.sparse:
        from dejavu_jax.predictors import load_predictors
        from dejavu_jax.sparse import SparsityConfig, sparse_decode_fn

        predictors = load_predictors(args.predictors, model)  # None: <model dir>/predictors
        sparsity = SparsityConfig(mlp_density=args.mlp_density, mlp_threshold=args.mlp_threshold,
                                  head_keep=args.head_keep, lookahead=predictors.lookahead)
        runs.append(("sparse", sparse_decode_fn(predictors, sparsity)))
    for name, fn in runs:
        texts = generate(model, tok, prompts, args.max_new_tokens, decode_fn=fn, **sampling)  # compiles
        t0 = time.perf_counter()
        texts = generate(model, tok, prompts, args.max_new_tokens, decode_fn=fn, **sampling)
        dt = time.perf_counter() - t0
        for p, t in zip(prompts, texts):
            print(f"[{name}] {p}{t}")
        n = len(prompts) * args.max_new_tokens
        print(f"[{name}] {n} tokens in {dt * 1e3:.0f} ms ({n / dt:.0f} tokens/s, {model.config.num_hidden_layers} "
              f"layers, {np.dtype(model.dtype).name}, {model.num_bytes() / 1e6:.0f} MB of weights)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an OPT model (dense, or --sparse)",
                       description="Generate continuations of prompts. With no --model, runs the "
                       "reference OPT committed under models/.")
    p.add_argument("--model", help=f"HF OPT dir or orbax checkpoint (default: {DEFAULT_MODEL.relative_to(REPO_ROOT)})")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--sparse", action="store_true", help="decode with contextual sparsity")
    p.add_argument("--compare", action="store_true", help="with --sparse: also run dense and show both")
    p.add_argument("--predictors", help="predictor dir (default: <model>/predictors)")
    p.add_argument("--mlp-density", type=float, default=None, help="fraction of MLP neurons kept")
    p.add_argument("--mlp-threshold", type=float, default=None,
                   help="keep the MLP neurons whose predictor logit exceeds this (-1: within 1%% perplexity on "
                        "the reference model); with --mlp-density 1.0 no cap")
    p.add_argument("--head-keep", type=float, default=None, help="fraction of heads kept")
    p.set_defaults(func=_cmd_generate)


# ---- bench --------------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    from dejavu_jax import bench

    p = sub.add_parser("bench", help="decode benchmark on random weights in real OPT shapes (GPU)",
                       description=bench.__doc__)
    bench.add_arguments(p)

    def run(args):
        records = bench.run_sweep(args.models.split(","), [int(b) for b in args.batches.split(",")],
                                  args.impls.split(","), args.prompt_len, args.new_tokens, args.reps,
                                  args.out, args.timeout)
        print(bench.table(records))

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dejavu", description="Deja Vu contextual sparsity for "
                                     "OPT in JAX: convert checkpoints, generate, evaluate, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_bench(sub)
    for name in EXTERNAL_SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DejavuError as e:
        print(f"dejavu {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
