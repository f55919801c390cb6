"""ReLU sparsity facts equal a direct computation on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.eval.sparsity import mlp_activations, plot_sparsity, sparsity_facts
from dejavu_jax.model import OPTModel
from dejavu_jax.training import tiny_model_config

CFG = tiny_model_config(vocab_size=320, max_position_embeddings=32, ffn_dim=40)


def test_sparsity_facts(tmp_path):
    params = M.init_params(CFG, jax.random.key(0), std=0.3)
    # a negative fc1 bias makes sparsity differ between layers
    params["layers"][1]["mlp"]["b1"] = params["layers"][1]["mlp"]["b1"] - 0.5
    model = OPTModel(CFG, params)
    tokens = np.random.default_rng(0).integers(0, 300, (5, 16)).astype(np.int32)
    facts = sparsity_facts(model, tokens, batch_size=2, topk_fractions=(0.1, 1.0))
    hs = mlp_activations(params, jnp.asarray(tokens), CFG)
    for layer, h in enumerate(hs):
        zero = np.asarray(h == 0).reshape(-1, CFG.ffn_dim).mean(-1)
        got = facts["layers"][layer]
        assert got["zero_frac"] == pytest.approx(zero.mean(), abs=1e-6)
        assert got["zero_frac_max"] == pytest.approx(zero.max(), abs=1e-6)
        assert got["topk_share"]["1.0"] == pytest.approx(1.0, abs=1e-5)
        assert 0 < got["topk_share"]["0.1"] < 1
    assert facts["relu_zero_frac_per_layer"][1] > facts["relu_zero_frac_per_layer"][0]
    assert facts["tokens"] == 80
    # the captured MLP does not change the forward
    x = M.forward_params(params, jnp.asarray(tokens), CFG)
    assert np.isfinite(np.asarray(x)).all()
    plot_sparsity(facts, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
