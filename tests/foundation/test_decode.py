"""dense_decode / generate / forward against Hugging Face, and their input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dejavu_jax as dj
from dejavu_jax.errors import InputError


@pytest.fixture(scope="module")
def pair(tiny_hf_model, tiny_opt_dir):
    """(HF model, our model loaded from its saved directory), f32."""
    import jax.numpy as jnp

    return tiny_hf_model("pre_ln"), dj.load_opt(tiny_opt_dir("pre_ln"), dtype=jnp.float32, progress=False)


def hf_greedy(hf, tokens, mask, n, eos=None):
    out = hf.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=n,
                      do_sample=False, eos_token_id=eos, pad_token_id=1)
    return out.numpy()


def left_padded(rng, lengths, total, vocab):
    tokens = np.full((len(lengths), total), 1, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.integers(3, vocab, n)
        mask[i, total - n:] = 1
    return tokens, mask


def test_greedy_matches_hf_generate_left_padded_batch(pair):
    hf, model = pair
    rng = np.random.default_rng(0)
    tokens, mask = left_padded(rng, [7, 3, 5], 7, model.config.vocab_size)
    ref = hf_greedy(hf, tokens, mask, 16)
    ours = np.asarray(dj.dense_decode(model, tokens, 16, attention_mask=mask))
    assert ours.shape == (3, 7 + 16) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 3), total=st.integers(1, 12), seed=st.integers(0, 2**16), n=st.integers(1, 6))
def test_greedy_matches_hf_hypothesis(pair, batch, total, seed, n):
    hf, model = pair
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, total + 1, batch)
    lengths[0] = total
    tokens, mask = left_padded(rng, lengths, total, model.config.vocab_size)
    ours = np.asarray(dj.dense_decode(model, tokens, n, attention_mask=mask))
    np.testing.assert_array_equal(ours, hf_greedy(hf, tokens, mask, n))


def test_eos_stops_rows_and_pads(pair):
    hf, model = pair
    rng = np.random.default_rng(1)
    tokens, mask = left_padded(rng, [6, 4], 6, model.config.vocab_size)
    free = np.asarray(dj.dense_decode(model, tokens, 12, attention_mask=mask))
    eos = int(free[0, 6 + 2])  # a token row 0 emits at its third step
    ours = np.asarray(dj.dense_decode(model, tokens, 12, attention_mask=mask, eos_token_id=eos))
    ref = hf_greedy(hf, tokens, mask, 12, eos=eos)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)  # HF stops once all rows finished
    first = 6 + int(np.argmax(ours[0, 6:] == eos))
    assert (ours[0, first + 1:] == model.config.pad_token_id).all()


def test_sampling_is_seeded_and_respects_top_k(pair):
    _, model = pair
    tokens = np.array([[2, 10, 11, 12]])
    kw = dict(temperature=1.3, top_k=3, seed=7)
    a = np.asarray(dj.dense_decode(model, tokens, 10, **kw))
    b = np.asarray(dj.dense_decode(model, tokens, 10, **kw))
    c = np.asarray(dj.dense_decode(model, tokens, 10, temperature=1.3, top_k=3, seed=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 sampling is greedy whatever the temperature
    greedy = np.asarray(dj.dense_decode(model, tokens, 10))
    np.testing.assert_array_equal(np.asarray(dj.dense_decode(model, tokens, 10, temperature=2.0, top_k=1)), greedy)
    # every sampled token is among the top-3 of the model's own logits at that point
    logits = np.asarray(dj.forward(model, a[:, :-1]))[0, 3:]
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    assert all(tok in row for tok, row in zip(a[0, 4:], top3))


def test_top_p_tiny_is_greedy(pair):
    _, model = pair
    tokens = np.array([[2, 30, 40]])
    np.testing.assert_array_equal(np.asarray(dj.dense_decode(model, tokens, 8, temperature=1.0, top_p=1e-6)),
                                  np.asarray(dj.dense_decode(model, tokens, 8)))


def test_forward_matches_hf(pair):
    hf, model = pair
    rng = np.random.default_rng(2)
    tokens, mask = left_padded(rng, [9, 5], 9, model.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(dj.forward(model, tokens, attention_mask=mask))
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4)


def test_generate_text(pair, tiny_opt_dir):
    _, model = pair
    tok = dj.load_tokenizer(model)
    texts = dj.generate(model, tok, ["hello world", "The quick brown"], max_new_tokens=5)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    enc = tok(["hello world"], return_tensors="np")
    ids = np.asarray(dj.dense_decode(model, enc["input_ids"], 5, eos_token_id=model.config.eos_token_id))
    assert texts[0] == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=np.zeros((1, 0), np.int32)), "empty"),
    (dict(prompt_tokens=np.array([[2, 5, 999]])), "outside the vocabulary"),
    (dict(prompt_tokens=np.array([[2, 5, -1]])), "outside the vocabulary"),
    (dict(prompt_tokens=np.array([[2, 5, 6]]), max_new_tokens=62), "exceeds the model's position table"),
    (dict(prompt_tokens=np.array([[2, 5, 6]]), attention_mask=np.ones((1, 4))), "attention_mask has shape"),
    (dict(prompt_tokens=np.array([[2, 5, 6]]), attention_mask=np.array([[1, 1, 0]])), "LEFT padding"),
    (dict(prompt_tokens=np.array([[2, 5, 6]]), attention_mask=np.array([[0, 0, 0]])), "empty"),
    (dict(prompt_tokens=np.array([[2.0, 5.0]])), "integer token ids"),
    (dict(prompt_tokens=np.array([[2, 5]]), max_new_tokens=0), "positive integer"),
    (dict(prompt_tokens=np.array([[2, 5]]), temperature=-1.0), "temperature"),
    (dict(prompt_tokens=np.array([[2, 5]]), temperature=1.0, top_k=0), "top_k"),
    (dict(prompt_tokens=np.array([[2, 5]]), temperature=1.0, top_p=1.5), "top_p"),
])
def test_bad_input_gives_clear_error(pair, kwargs, match):
    _, model = pair
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(InputError, match=match):
        dj.dense_decode(model, **kwargs)


def test_forward_bad_input(pair):
    _, model = pair
    with pytest.raises(InputError, match="attention_mask has shape"):
        dj.forward(model, np.array([[2, 3]]), attention_mask=np.ones((1, 3)))
    with pytest.raises(InputError, match="token ids"):
        dj.forward(model, np.array([[2, 400]]))
    with pytest.raises(InputError, match="max_position_embeddings"):
        dj.forward(model, np.full((1, 65), 5))
