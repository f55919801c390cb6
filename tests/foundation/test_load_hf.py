"""`load_opt` on Hugging Face directories: our logits equal HF torch's, for every OPT variant
and file format, full forward (left-padded batches included) and cached decode."""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dejavu_jax.checkpoint import load_opt
from dejavu_jax.model import forward_cached, forward_params, init_cache, positions_from_mask

VARIANTS = ("pre_ln", "post_ln_proj", "no_bias_8h", "no_affine_1h")
FORMATS = ("safetensors", "sharded", "bin", "bin_sharded")
PAD = 1
F32_ATOL = 1e-4

forward = jax.jit(forward_params, static_argnums=2)
step = jax.jit(forward_cached, static_argnums=6)


def hf_logits(hf_model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(input_ids=torch.as_tensor(tokens),
                       attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()


def our_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    m = None if mask is None else jnp.asarray(mask)
    return np.asarray(forward(model.params, jnp.asarray(tokens), model.config, m))


def left_padded_batch(seed: int, lengths: list[int], total: int, vocab: int):
    """tokens, mask [B, total]: row b has total - lengths[b] pads on the left."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (len(lengths), total), dtype=np.int32)
    mask = (np.arange(total)[None] >= total - np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask > 0, tokens, PAD).astype(np.int32), mask


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_forward_equals_hf(variant, fmt, tiny_hf_model, tiny_opt_dir):
    hf = tiny_hf_model(variant)
    model = load_opt(tiny_opt_dir(variant, fmt), jnp.float32, progress=False)
    assert all(x.dtype == jnp.float32 and isinstance(x, jax.Array)
               for x in jax.tree.leaves(model.params))
    tokens, mask = left_padded_batch(0, [9, 4, 1], 9, hf.config.vocab_size)
    np.testing.assert_allclose(our_logits(model, tokens), hf_logits(hf, tokens), rtol=0, atol=F32_ATOL)
    real = mask.astype(bool)  # logits at left-pad positions are not defined
    np.testing.assert_allclose(our_logits(model, tokens, mask)[real],
                               hf_logits(hf, tokens, mask)[real], rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_forward_close_to_hf(variant, tiny_hf_model, tiny_opt_dir):
    """bf16 / f16 logits against HF's f32: as close as HF's own bf16 model gets."""
    hf = tiny_hf_model(variant)
    tokens, mask = left_padded_batch(1, [12, 7], 12, hf.config.vocab_size)
    real = mask.astype(bool)
    ref = hf_logits(hf, tokens, mask)[real]
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens, mask)[real]
    for dtype, tol in ((jnp.bfloat16, 2e-2), (jnp.float16, 3e-3)):
        model = load_opt(tiny_opt_dir(variant), dtype, progress=False)
        assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(dtype)}
        err = rel_err(our_logits(model, tokens, mask)[real], ref)
        assert err < tol, (dtype, err)
        if dtype == jnp.bfloat16:
            assert err < 1.5 * rel_err(hf_bf16, ref), (err, rel_err(hf_bf16, ref))


def cached_decode_logits(model, tokens: np.ndarray, mask: np.ndarray, prompt_len: int):
    """Prefill tokens[:, :prompt_len], then feed the rest one token at a time (teacher
    forcing). Returns [B, T - prompt_len + 1, V]: the prefill's last logits, then each step's."""
    B, T = tokens.shape
    cache = init_cache(model.config, B, T + 3, model.dtype)  # a few spare slots past the end
    kv_valid = jnp.asarray(np.pad(mask, ((0, 0), (0, 3)), constant_values=1).astype(bool))
    positions = positions_from_mask(jnp.asarray(mask))
    logits, cache = step(model.params, jnp.asarray(tokens[:, :prompt_len]), positions[:, :prompt_len],
                         cache, kv_valid, 0, model.config)
    out = [np.asarray(logits)]
    for t in range(prompt_len, T):
        logits, cache = step(model.params, jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1],
                             cache, kv_valid, jnp.int32(t), model.config)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_equals_hf(variant, tiny_hf_model, tiny_opt_dir):
    """Prefill + T=1 steps against the KV cache: each step's logits equal HF's full forward at
    that position, for a left-padded batch (f32), and stay within bf16 tolerance in bf16."""
    hf = tiny_hf_model(variant)
    prompt_len, new = 6, 5
    prompt, prompt_mask = left_padded_batch(2, [6, 3, 1], prompt_len, hf.config.vocab_size)
    continuation, _ = left_padded_batch(3, [new] * 3, new, hf.config.vocab_size)
    tokens = np.concatenate([prompt, continuation], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(continuation)], axis=1)
    ref = hf_logits(hf, tokens, mask)[:, prompt_len - 1:]
    ours = cached_decode_logits(load_opt(tiny_opt_dir(variant), jnp.float32, progress=False),
                                tokens, mask, prompt_len)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=F32_ATOL)
    ours16 = cached_decode_logits(load_opt(tiny_opt_dir(variant), jnp.bfloat16, progress=False),
                                  tokens, mask, prompt_len)
    assert rel_err(ours16, ref) < 2e-2


@functools.cache
def _model(dir_, dtype):
    return load_opt(dir_, dtype, progress=False)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(variant=st.sampled_from(VARIANTS), seed=st.integers(0, 2**16),
       lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3), extra_pad=st.integers(0, 2))
def test_forward_equals_hf_property(tiny_hf_model, tiny_opt_dir, variant, seed, lengths, extra_pad):
    """Any batch size, prompt length and left padding (rows of different lengths, and a common
    pad prefix) gives HF's logits at every real position."""
    hf = tiny_hf_model(variant)
    model = _model(tiny_opt_dir(variant), jnp.float32)
    tokens, mask = left_padded_batch(seed, lengths, max(lengths) + extra_pad, hf.config.vocab_size)
    real = mask.astype(bool)
    np.testing.assert_allclose(our_logits(model, tokens, mask)[real],
                               hf_logits(hf, tokens, mask)[real], rtol=0, atol=F32_ATOL)


def test_dtype_none_keeps_checkpoint_dtype(tiny_opt_dir):
    model = load_opt(tiny_opt_dir("pre_ln"), None, progress=False)
    assert model.dtype == jnp.float32  # tiny HF models are saved in float32
    assert model.source == str(tiny_opt_dir("pre_ln").absolute())


def test_sharding_callable_gets_every_leaf_path(tiny_opt_dir):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    seen = []

    def sharding_for(path):
        seen.append(path)
        return replicated

    model = load_opt(tiny_opt_dir("pre_ln"), jnp.float32, sharding=sharding_for, progress=False)
    flat, _ = jax.tree_util.tree_flatten_with_path(model.params)
    expected = [tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path) for path, _ in flat]
    assert sorted(map(str, seen)) == sorted(map(str, expected))
    assert ("layers", 1, "mlp", "fc1") in seen
    assert all(x.sharding == replicated for x in jax.tree.leaves(model.params))
    single = load_opt(tiny_opt_dir("pre_ln"), jnp.float32, sharding=replicated, progress=False)
    assert all(x.sharding == replicated for x in jax.tree.leaves(single.params))
