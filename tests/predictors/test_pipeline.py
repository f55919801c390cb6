"""The collect -> train -> evaluate path on a tiny random model; saving, refusing, resuming."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.errors import CheckpointError, InputError
from dejavu_jax.model import random_model
from dejavu_jax.predictors import (collect_activations, load_predictors, predict_mlp_scores, save_predictors,
                                   train_predictors)
from dejavu_jax.predictors.evaluate import evaluate_predictors, summarize
from dejavu_jax.predictors.masked_eval import perplexity
from dejavu_jax.predictors.shards import ActivationSet
from dejavu_jax.predictors.tokens import windows

from conftest import SEQ_LEN, TINY


@pytest.fixture(scope="module")
def trained(tiny_model, collection):
    out, _ = collection
    return train_predictors(tiny_model, out, rank=8, batch_size=128, max_epochs=3, progress=False)


def test_collection_layout(collection):
    out, info = collection
    train, held = ActivationSet(out, "train"), ActivationSet(out, "heldout")
    assert len(train.shards) > 1
    assert info["positions"] == {"train": train.num_positions, "heldout": held.num_positions}
    L, d, F, H = TINY.num_hidden_layers, TINY.hidden_size, TINY.ffn_dim, TINY.num_attention_heads
    n = train.num_positions
    assert train.load("attn_in").shape == (L, n, d) and train.load("mlp_act").shape == (L, n, F)
    assert train.load("head_norm", [1]).shape == (1, n, H)
    act, bits = train.load("mlp_act"), np.unpackbits(train.load("mlp_active"), axis=-1).astype(bool)
    np.testing.assert_array_equal(act > 0, bits)
    pos = train.load("positions")
    assert pos.min() >= 1 and pos.max() < SEQ_LEN


def test_train_evaluate_and_masked_perplexity(tiny_model, collection, trained):
    out, info = collection
    pred = trained
    assert pred.num_layers == TINY.num_hidden_layers and pred.lookahead
    assert all(k % pred.block_size == 0 or k == TINY.ffn_dim for k in pred.mlp_k)
    ev = evaluate_predictors(pred, out, TINY)
    for r in ev["layers"]:
        for key in ("layer", "mlp_k", "mlp_density", "mlp_recall", "mlp_mass_recall", "head_k", "head_recall",
                    "lookahead", "predictor_bytes_frac"):
            assert key in r
        assert 0.0 <= r["mlp_recall"] <= 1.0
    assert summarize(ev["layers"])["mean_mlp_recall"] > 0.9  # calibrated to 0.99 on validation data
    stream = np.random.default_rng(1).integers(3, TINY.vocab_size, 400)
    win = windows(stream, range(4), SEQ_LEN, True)
    dense = perplexity(tiny_model, win, batch_size=4)
    sparse = perplexity(tiny_model, win, mode="predictor", predictors=pred, batch_size=4)
    assert np.isfinite(sparse) and sparse > 0 and np.isfinite(dense)


def test_save_load_round_trip_and_refusals(tiny_model, trained, tmp_path):
    path = save_predictors(trained, tmp_path / "pred", TINY, summary={"note": "test"})
    back = load_predictors(path, tiny_model)
    assert back.mlp_k == trained.mlp_k and back.head_k == trained.head_k and back.lookahead == trained.lookahead
    for name in trained.ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(trained, name))
    x = jnp.ones((2, TINY.hidden_size))
    np.testing.assert_array_equal(predict_mlp_scores(back, 1, x), predict_mlp_scores(trained, 1, x))
    assert load_predictors(path, tiny_model, dtype=jnp.bfloat16).mlp_w1.dtype == jnp.bfloat16
    deeper = random_model(TINY.replace(num_hidden_layers=3), dtype=jnp.float32)
    with pytest.raises(CheckpointError, match="num_hidden_layers: predictors 2, model 3"):
        load_predictors(path, deeper)
    wider = random_model(TINY.replace(ffn_dim=256), dtype=jnp.float32)
    with pytest.raises(CheckpointError, match="ffn_dim"):
        load_predictors(path, wider)
    with pytest.raises(CheckpointError, match="no predictors"):
        load_predictors(tmp_path / "nothing", tiny_model)


def test_collection_resumes_and_refuses_other_settings(tiny_model, token_stream, collection, tmp_path):
    src, _ = collection
    out = tmp_path / "acts"
    shutil.copytree(src, out)
    shards = sorted((out / "train").glob("shard_*"))
    shutil.rmtree(shards[1])  # as if interrupted: one finished shard missing, a partial one left
    (out / "train" / ".shard_00001.tmp999").mkdir()
    stamp = shards[0].stat().st_mtime_ns
    collect_activations(tiny_model, token_stream, out, positions_per_seq=8, seq_len=SEQ_LEN, shard_bytes=60_000,
                        batch_size=8, progress=False)
    assert shards[0].stat().st_mtime_ns == stamp  # finished shards are not redone
    assert not list((out / "train").glob(".shard_*"))
    for field in ("attn_in", "mlp_act", "head_norm", "tokens"):
        np.testing.assert_array_equal(ActivationSet(out).load(field), ActivationSet(src).load(field))
    with pytest.raises(InputError, match="other settings"):
        collect_activations(tiny_model, token_stream, out, positions_per_seq=4, seq_len=SEQ_LEN, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["positions_per_seq"] == 8


def test_training_refuses_another_models_activations(collection):
    out, _ = collection
    other = random_model(TINY.replace(hidden_size=64), dtype=jnp.float32)
    with pytest.raises(InputError, match="another model config"):
        train_predictors(other, out, rank=4, progress=False)


def test_spaced_indices_and_text_windows(tmp_path):
    from dejavu_jax.predictors.tokens import spaced_indices, text_windows

    assert spaced_indices(10, 20, 3) == [10, 14, 19]
    assert spaced_indices(0, 4, 10) == [0, 1, 2, 3]  # never more than there are
    ids = np.arange(3, 3 + 100, dtype=np.int32)
    np.save(tmp_path / "t.npy", ids)
    w, n = text_windows(tmp_path / "t.npy", None, 2, 11)
    assert n == 100 and w.shape == (2, 11) and (w[:, 0] == 2).all()
    np.testing.assert_array_equal(w[0, 1:], ids[:10])
    np.testing.assert_array_equal(w[1, 1:], ids[90:100])  # the last of the 10 windows
    with pytest.raises(InputError, match="too few for one window"):
        text_windows(tmp_path / "t.npy", None, 2, 200)
