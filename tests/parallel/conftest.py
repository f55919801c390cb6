"""Fixtures of the multi-device cases files. Imports stay inside the fixtures: the main test
run loads this file too, and must not touch JAX's backend here (see _subproc.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model():
    import jax.numpy as jnp

    from cases_common import CFG
    from dejavu_jax import model as M
    return M.random_model(CFG, jnp.float32, std=0.3, seed=1)


@pytest.fixture(scope="module")
def pred():
    import jax.numpy as jnp

    from cases_common import CFG
    from dejavu_jax.predictors.modules import random_predictors
    return random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)


@pytest.fixture(scope="module")
def prompt():
    import numpy as np

    from cases_common import CFG
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (2, 6))
    mask = np.ones((2, 6), np.int32)
    mask[1, :2] = 0
    return tokens, mask
