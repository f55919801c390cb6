"""The device mesh for tensor parallelism: one axis, ``"tp"``.

    mesh = make_mesh(tp=2)            # the first 2 devices (all of them with tp=None)
    tp_size(mesh)                     # 2

Megatron-style tensor parallelism splits every layer across the ``tp`` devices: attention
heads and MLP neurons (the units contextual sparsity selects) are divided evenly, so each
device gathers its own selected heads and neurons. The same code runs on several hosts: call
`jax.distributed.initialize()` first, and ``jax.devices()`` lists every host's devices
(docs/multi_gpu.md).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import ConfigError

AXIS = "tp"


def make_mesh(tp: int | None = None, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with axis ``"tp"`` over ``tp`` devices (default: all of ``devices``, which
    default to ``jax.devices()``, every process's devices under `jax.distributed`)."""
    devices = list(jax.devices() if devices is None else devices)
    tp = len(devices) if tp is None else int(tp)
    if not 1 <= tp <= len(devices):
        raise ConfigError(f"tp={tp} needs between 1 and {len(devices)} devices; this process sees "
                          f"{len(devices)} ({devices[0].platform}). On a CPU, simulate more with "
                          "XLA_FLAGS=--xla_force_host_platform_device_count=N set before jax starts.")
    return jax.sharding.Mesh(np.array(devices[:tp]), (AXIS,))


def tp_size(mesh: jax.sharding.Mesh) -> int:
    if AXIS not in mesh.shape:
        raise ConfigError(f"the mesh has axes {tuple(mesh.shape)}; tensor parallelism needs an axis "
                          f"named {AXIS!r} (make_mesh builds one).")
    return int(mesh.shape[AXIS])


def check_divisible(config: OPTConfig, tp: int) -> None:
    """Heads and MLP neurons must split evenly over the ``tp`` devices."""
    H, F = config.num_attention_heads, config.ffn_dim
    if H % tp or F % tp:
        raise ConfigError(
            f"tensor parallelism over {tp} devices needs heads ({H}) and ffn_dim ({F}) divisible by "
            f"{tp}; choose tp among {[t for t in range(1, H + 1) if H % t == 0 and F % t == 0]}.")


def vocab_sharded(config: OPTConfig, tp: int) -> bool:
    """True when the embedding / LM head split over the vocabulary (vocab_size divisible by tp;
    every public OPT's 50272 is divisible by 2..32). Otherwise they are replicated."""
    return config.vocab_size % tp == 0


class LocalView:
    """What per-device layer code reads from the config: the head size (unchanged) and the
    number of heads this device holds. `dejavu_jax.sparse.sparse_attention` reads these two."""

    def __init__(self, config: OPTConfig, tp: int):
        self.head_dim = config.head_dim
        self.num_attention_heads = config.num_attention_heads // tp
        self.hidden_size = config.hidden_size
        self.ffn_dim = config.ffn_dim // tp
