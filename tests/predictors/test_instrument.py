"""The instrumented forward is the model's forward, and its records are what they claim."""

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.model import random_model
from dejavu_jax.predictors.instrument import run_layers, top_k_mask
from dejavu_jax.predictors.masked_eval import perplexity

from conftest import TINY


def _records(model, tokens):
    recs = {}
    logits = run_layers(model.params, tokens, model.config, on_layer=lambda l, r: recs.__setitem__(l, dict(r)))
    return logits, recs


def test_unmasked_forward_equals_model(tiny_model):
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY.vocab_size)
    logits, _ = _records(tiny_model, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(M.forward_params(tiny_model.params, tokens, TINY)))


def test_post_layernorm_forward_equals_model():
    cfg = TINY.replace(do_layer_norm_before=False)
    model = random_model(cfg, dtype=jnp.float32, std=0.1)
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, cfg.vocab_size)
    logits, recs = _records(model, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(M.forward_params(model.params, tokens, cfg)))
    assert recs[1]["mlp_in"].shape == (1, 12, cfg.hidden_size)


def test_records_match_a_manual_layer(tiny_model):
    cfg, lp = TINY, tiny_model.params["layers"][0]
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    _, recs = _records(tiny_model, tokens)
    x = recs[0]["attn_in"]
    T = x.shape[1]
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (2, T, T))
    h = M.layer_norm(lp["attn_ln"], x)
    q, k, v = M.qkv_projection(lp["attn"], h, cfg.head_dim)
    o = M.attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed)
    np.testing.assert_allclose(recs[0]["head_norm"], jnp.linalg.norm(o, axis=-1), rtol=1e-5)
    mlp_in = x + M.out_projection(lp["attn"], o)
    np.testing.assert_allclose(recs[0]["mlp_in"], mlp_in, rtol=1e-5, atol=1e-6)
    pre = M.layer_norm(lp["mlp_ln"], mlp_in) @ lp["mlp"]["fc1"].T + lp["mlp"]["b1"]
    np.testing.assert_allclose(recs[0]["mlp_act"], jax.nn.relu(pre), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(recs[1]["attn_in"], x + (recs[0]["mlp_in"] - x) + (
        M.mlp(lp["mlp"], M.layer_norm(lp["mlp_ln"], mlp_in))), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(recs[1]["prev_attn_in"], x)


def test_top_k_mask_static_and_traced_agree():
    s = jax.random.normal(jax.random.key(3), (5, 40))
    for k in (1, 7, 40):
        static = top_k_mask(s, k)
        traced = jax.jit(top_k_mask)(s, jnp.int32(k))
        np.testing.assert_array_equal(static, traced)
        assert (static.sum(-1) == k).all()


def test_oracle_keeping_everything_is_dense(tiny_model):
    win = np.random.default_rng(0).integers(0, TINY.vocab_size, (3, 16))
    dense = perplexity(tiny_model, win, batch_size=2)
    full = perplexity(tiny_model, win, mode="oracle", mlp_k=TINY.ffn_dim, head_k=TINY.num_attention_heads,
                      batch_size=2)
    fewer = perplexity(tiny_model, win, mode="oracle", mlp_k=8, head_k=1, batch_size=2)
    assert abs(full - dense) / dense < 1e-5
    assert abs(fewer - dense) / dense > 1e-3
