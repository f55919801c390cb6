"""Training on real text with a tiny config: the loss falls, resuming is exact, the step's
pieces equal the model's forward, and bad settings are clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.errors import DejavuError
from dejavu_jax.training import TrainConfig, tiny_model_config, train
from dejavu_jax.training.batches import eval_batch, train_batch
from dejavu_jax.training.step import (cross_entropy, decay_mask, final_hidden,
                                      init_train_params, learning_rate, loss_fn)

CFG = tiny_model_config()
TC = TrainConfig(seq_len=32, batch_size=8, warmup_steps=3, total_steps=12, peak_lr=1e-2,
                 log_every=4, eval_every=6, checkpoint_every=6, eval_sequences=4, loss_chunk=8)


def test_final_hidden_and_chunked_loss_equal_the_model_forward():
    params = init_train_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 5000)
    logits = M.forward_params(params, tokens[:, :-1], CFG)
    logp = jax.nn.log_softmax(logits, -1)
    direct = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    h = final_hidden(params, tokens[:, :-1], CFG)
    np.testing.assert_allclose(jnp.einsum("bte,ve->btv", h, params["embed_tokens"]), logits, atol=1e-5)
    for chunk in (0, 4, 16):
        np.testing.assert_allclose(loss_fn(params, tokens, CFG, jnp.float32, chunk), direct, rtol=1e-5)
    nll, n = cross_entropy(h, params["embed_tokens"], tokens[:, 1:].at[0, :5].set(-1), chunk=4)
    assert int(n) == 2 * 16 - 5


def test_schedule_and_decay_mask():
    lrs = [learning_rate(s, TC, 12) for s in range(14)]
    assert lrs[0] == pytest.approx(TC.peak_lr / 3) and lrs[2] == pytest.approx(TC.peak_lr)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[12] == pytest.approx(TC.peak_lr * TC.min_lr_ratio) == lrs[13]
    mask = decay_mask(init_train_params(CFG, jax.random.key(0)))
    assert mask["embed_tokens"] and mask["layers"][0]["mlp"]["fc1"]
    assert not mask["layers"][0]["mlp"]["b1"] and not mask["layers"][0]["attn"]["bqkv"]
    assert not mask["final_layer_norm"]["scale"]


def test_batches_are_a_function_of_step():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = train_batch(tokens, 7, 4, 16), train_batch(tokens, 7, 4, 16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 17) and a.dtype == np.int32
    assert np.all(np.diff(a, axis=1) == 1)  # contiguous windows
    assert not np.array_equal(a, train_batch(tokens, 8, 4, 16))
    assert eval_batch(tokens, 5, 16).shape == (5, 17)
    with pytest.raises(DejavuError, match="shorter than one"):
        train_batch(tokens[:10], 0, 2, 16)


def test_a_few_steps_lower_the_loss_on_real_text(small_cache, tmp_path):
    result = train(CFG, TC, small_cache.train, small_cache.heldout, tmp_path, progress=False,
                   log=lambda *a: None)
    losses = [r["loss"] for r in result.history if "loss" in r]
    heldout = [r["heldout_loss"] for r in result.history if "heldout_loss" in r]
    assert result.finished and result.steps == 12 and result.tokens_seen == 12 * 8 * 32
    assert np.mean(losses[-3:]) < losses[0] - 1.5, losses
    assert heldout[-1] < heldout[0] and heldout[-1] < 9.5, heldout
    assert (tmp_path / "train_log.jsonl").is_file()


def test_resume_gives_the_same_state(small_cache, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    straight = train(CFG, TC.replace(total_steps=6), small_cache.train, small_cache.heldout,
                     tmp_path / "a", **quiet)
    first = train(CFG, TC.replace(total_steps=6), small_cache.train, small_cache.heldout,
                  tmp_path / "b", max_steps=3, **quiet)
    assert not first.finished and first.steps == 3
    resumed = train(CFG, TC.replace(total_steps=6), small_cache.train, small_cache.heldout,
                    tmp_path / "b", **quiet)
    assert resumed.finished and resumed.steps == 6
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)
    with pytest.raises(DejavuError, match="other settings"):
        train(CFG, TC.replace(total_steps=6, peak_lr=1e-3), small_cache.train, small_cache.heldout,
              tmp_path / "b", **quiet)


def test_bad_training_settings_are_clear_errors(small_cache, tmp_path):
    with pytest.raises(DejavuError, match="exceeds the model's 64 positions"):
        train(CFG, TC.replace(seq_len=128), small_cache.train, small_cache.heldout, tmp_path,
              progress=False)
    with pytest.raises(DejavuError, match="time budget"):
        train(CFG, TC.replace(total_steps=None), small_cache.train, small_cache.heldout, tmp_path,
              progress=False)
