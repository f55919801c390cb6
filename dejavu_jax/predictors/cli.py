"""Arguments shared by the predictor CLIs (`dejavu collect`, `train-predictors`, `analyze`)."""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from dejavu_jax.config import OPTConfig, preset
from dejavu_jax.errors import InputError

# A small config for smoke tests of the whole pipeline on a CPU ("--model random:tiny").
TINY = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, ffn_dim=256, num_attention_heads=4,
                 max_position_embeddings=256)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="model directory (HF or dejavu orbax), or random:<preset> / random:tiny for smoke tests")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to run the model in (default float32: exact labels)")


def add_token_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", required=True,
                   help="token stream: .npy of ids, or .txt / .txt.xz text (tokenized with the model dir's tokenizer)")
    p.add_argument("--heldout-tokens", default=None, help="held-out stream (default: the last part of --tokens)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to read from --tokens")
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=256)


def load_model(spec: str, dtype: str = "float32"):
    """An OPTModel from a directory, or ``random:<preset>`` / ``random:tiny`` (random weights)."""
    dt = jnp.dtype(dtype)
    if spec.startswith("random:"):
        from dejavu_jax.model import random_model

        name = spec.split(":", 1)[1]
        return random_model(TINY if name == "tiny" else preset(name), dtype=dt, seed=0, std=0.1)
    try:
        from dejavu_jax.checkpoint import load_opt
    except ImportError as e:
        raise InputError(f"cannot load {spec}: dejavu_jax.checkpoint is unavailable ({e}).") from None
    return load_opt(spec, dt, progress=False)


def load_streams(args, model):
    """(train stream, held-out stream or None) from --tokens / --heldout-tokens."""
    from dejavu_jax.predictors.tokens import load_token_stream

    tok_dir = model.source
    train = load_token_stream(args.tokens, tokenizer_dir=tok_dir, max_tokens=args.max_tokens)
    held = None
    if args.heldout_tokens:
        cap = max(args.seq_len, int(args.heldout_fraction * args.max_tokens)) if args.max_tokens else None
        held = load_token_stream(args.heldout_tokens, tokenizer_dir=tok_dir, max_tokens=cap)
    return train, held
