"""The predictor subcommands of ``dejavu``: collect, analyze, train-predictors.

`add_parser(subparsers)` registers all three (`dejavu_jax.cli` calls it); each subcommand's
own parser lives beside its code (`collect.add_parser`, ...). The helpers here are the
arguments they share: the model (a directory, by default the committed reference model, or
``random:<preset>`` / ``random:tiny`` for smoke tests) and the token streams.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax.numpy as jnp

from dejavu_jax.config import OPTConfig, preset
from dejavu_jax.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_TOKENIZER = REPO_ROOT.parent / "shared" / "data" / "tokenizer" / "opt"
# A small config for smoke tests of the whole pipeline on a CPU ("--model random:tiny").
TINY = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, ffn_dim=256, num_attention_heads=4,
                 max_position_embeddings=256)


def add_parser(subparsers) -> None:
    """Register ``dejavu collect``, ``dejavu analyze`` and ``dejavu train-predictors``."""
    from dejavu_jax.predictors import analysis, collect, train

    collect.add_parser(subparsers)
    analysis.add_parser(subparsers)
    train.add_parser(subparsers)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory (HF or dejavu orbax; default: the reference model under models/), "
                        "or random:<preset> / random:tiny for smoke tests")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to run the model in (default float32: exact labels)")


def add_token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", required=True,
                   help="token stream: .npy of ids, or .txt / .txt.xz text (tokenized with OPT's tokenizer)")
    p.add_argument("--heldout-tokens", default=None, help="held-out stream (default: the last part of --tokens)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for text (default: the model's)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to read from --tokens")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=256)


def load_model(spec: str | None, dtype: str = "float32"):
    """An OPTModel from a directory (None: the reference model), or ``random:<preset>`` /
    ``random:tiny`` (random weights)."""
    dt = jnp.dtype(dtype)
    if spec and spec.startswith("random:"):
        from dejavu_jax.model import random_model

        name = spec.split(":", 1)[1]
        return random_model(TINY if name == "tiny" else preset(name), dtype=dt, seed=0, std=0.1)
    from dejavu_jax.checkpoint import load_opt

    if spec is None:
        from dejavu_jax.cli import resolve_model_dir

        spec = str(resolve_model_dir(None))
    if not Path(spec).exists():
        raise InputError(f"model directory {spec} does not exist.")
    return load_opt(spec, dt, progress=False)


def tokenizer_dir(arg: str | None, model) -> Path | None:
    """--tokenizer, else the model directory when it holds tokenizer files, else shared/data's."""
    if arg:
        return Path(arg)
    if model.source and (Path(model.source) / "vocab.json").exists():
        return Path(model.source)
    return SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else None


def load_streams(args, model):
    """(train stream, held-out stream or None) from --tokens / --heldout-tokens."""
    from dejavu_jax.predictors.tokens import load_token_stream

    tok_dir = tokenizer_dir(getattr(args, "tokenizer", None), model)
    train = load_token_stream(args.tokens, tokenizer_dir=tok_dir, max_tokens=args.max_tokens)
    held = None
    if args.heldout_tokens:
        cap = max(args.seq_len, int(args.heldout_fraction * args.max_tokens)) if args.max_tokens else None
        held = load_token_stream(args.heldout_tokens, tokenizer_dir=tok_dir, max_tokens=cap)
    return train, held
