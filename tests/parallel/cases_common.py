"""Shared set-up of the multi-device case files: 8 simulated CPU devices (set before JAX
starts its backend, so running a cases file directly with pytest works too)."""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                               " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

if jax.device_count() < 8:
    pytest.skip("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 set before "
                "JAX starts (tests/parallel/test_parallel.py does)", allow_module_level=True)


# ---- the tiny model every cases file decodes ----------------------------------------------------
from dejavu_jax.config import OPTConfig  # noqa: E402

CFG = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=8,
                max_position_embeddings=64)
TPS = (1, 2, 4, 8)
NEW = 8
