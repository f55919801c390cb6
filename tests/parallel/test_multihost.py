"""Several hosts, tested on one machine: 2 processes (2 simulated CPU devices each) joined by
`jax.distributed.initialize`, loading an orbax checkpoint onto the 4-device mesh (each
process reads its own shards) and decoding with the same code; tokens equal one device's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import dejavu_jax as dj
from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.predictors.modules import random_predictors

HERE = Path(__file__).resolve().parent
CFG = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=8,
                max_position_embeddings=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_decode_like_one_device(tmp_path):
    model = M.random_model(CFG, jnp.float32, std=0.3, seed=1)
    ckpt = dj.save(model, tmp_path / "ckpt")
    tokens = np.array([[2, 17, 40, 99, 5]])
    sp = dj.SparsityConfig(mlp_density=0.5, head_keep=0.5)
    pred = random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i), "2", port, str(ckpt),
                               str(tmp_path / f"out{i}.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    dense = np.asarray(dj.dense_decode(model, tokens, 6)).tolist()
    sparse = np.asarray(dj.sparse_decode(model, pred, tokens, 6, sparsity=sp)).tolist()
    for i in range(2):
        res = json.loads((tmp_path / f"out{i}.json").read_text())
        assert res["process_count"] == 2 and res["device_count"] == 4
        assert res["local_fc1_shards"] == [[64, 64], [64, 64]]  # this process's 2 of 4 shards
        assert res["dense"] == dense and res["sparse_global"] == sparse
