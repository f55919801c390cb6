"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_top_k(logits: jax.Array, top_k: int) -> jax.Array:
    """Keep the top_k largest logits per row; others -> -inf. logits: [B, V] f32."""
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Keep the smallest set of tokens whose probability sums to >= top_p (at least one)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def choose_tokens(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None,
                  top_p: float | None) -> jax.Array:
    """logits: [B, V] f32 -> token ids [B] int32. temperature == 0 means greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
