"""Batches from a flat token array: random windows for training, fixed ones for evaluation.

Training batch ``step`` is a pure function of (seed, step): ``batch_size`` windows of
``seq_len + 1`` tokens at offsets drawn by ``np.random.default_rng([seed, step])``. So a
resumed run sees exactly the batches the uninterrupted run would have, with no loader
state to save. Windows may cross book boundaries (each book starts with ``</s>``, as OPT's
documents do).
"""

from __future__ import annotations

import numpy as np

from dejavu_jax.errors import DejavuError


def train_batch(tokens: np.ndarray, step: int, batch_size: int, seq_len: int,
                seed: int = 0) -> np.ndarray:
    """[batch_size, seq_len + 1] int32 windows of ``tokens`` ([N] uint16, e.g. memory-mapped)."""
    n = tokens.shape[0] - seq_len - 1
    if n <= 0:
        raise DejavuError(f"the token array ({tokens.shape[0]} tokens) is shorter than one "
                          f"training window of {seq_len + 1}; lower seq_len or add text.")
    offsets = np.random.default_rng([seed, step]).integers(0, n + 1, size=batch_size)
    return np.asarray(tokens[offsets[:, None] + np.arange(seq_len + 1)], dtype=np.int32)


def eval_batch(tokens: np.ndarray, n_sequences: int, seq_len: int) -> np.ndarray:
    """[n, seq_len + 1] int32: ``n_sequences`` non-overlapping windows spread evenly over
    ``tokens`` (fewer if the text is short; at least one)."""
    window = seq_len + 1
    if tokens.shape[0] < window:
        raise DejavuError(f"held-out text ({tokens.shape[0]} tokens) is shorter than one "
                          f"window of {window}.")
    n = max(1, min(n_sequences, tokens.shape[0] // window))
    starts = np.linspace(0, tokens.shape[0] - window, n).astype(np.int64)
    return np.asarray(tokens[starts[:, None] + np.arange(window)], dtype=np.int32)
