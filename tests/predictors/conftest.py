"""Shared fixtures: a tiny random OPT and one activation collection from it (session-wide)."""

import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.config import OPTConfig
from dejavu_jax.model import random_model

TINY = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                 max_position_embeddings=64)
SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(TINY, dtype=jnp.float32, seed=0, std=0.1)


@pytest.fixture(scope="session")
def token_stream():
    return np.random.default_rng(0).integers(3, TINY.vocab_size, 8000).astype(np.uint16)


@pytest.fixture(scope="session")
def collection(tiny_model, token_stream, tmp_path_factory):
    from dejavu_jax.predictors import collect_activations

    out = tmp_path_factory.mktemp("acts")
    info = collect_activations(tiny_model, token_stream, out, positions_per_seq=8, seq_len=SEQ_LEN,
                               shard_bytes=60_000, batch_size=8, progress=False)
    return out, info
