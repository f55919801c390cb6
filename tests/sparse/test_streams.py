"""dejavu_jax.streams: a function on a second stream computes the same values as inline, and
the streamed call holds no nested call (the shape XLA:GPU can run on a side stream)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dejavu_jax.streams import eval_inlined, on_stream


def _fn(tree, x):
    """jits nested inside (jnp.where, jnp.take), a custom_jvp (relu) and a pytree in and out."""
    h = jax.nn.relu(x @ tree["w"]) + jnp.where(x.sum() > 0, 1.0, -1.0)
    idx = jax.lax.top_k(h, 3)[1]
    return {"idx": idx, "vals": jnp.take(h, idx), "none": None}


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_same_values_as_inline(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tree, x = {"w": jax.random.normal(k1, (6, 9))}, jax.random.normal(k2, (6,))
    want = _fn(tree, x)
    got = jax.jit(on_stream(_fn, 1))(tree, x)
    assert got["none"] is None
    np.testing.assert_array_equal(got["idx"], want["idx"])
    np.testing.assert_allclose(got["vals"], want["vals"], rtol=1e-6)
    closed = jax.make_jaxpr(_fn)(tree, x)
    np.testing.assert_allclose(eval_inlined(closed, tree["w"], x)[1], want["vals"], rtol=1e-6)


def test_streamed_call_is_flat_and_annotated():
    tree, x = {"w": jnp.ones((6, 9))}, jnp.ones((6,))
    text = jax.jit(on_stream(_fn, 2)).lower(tree, x).as_text()
    assert '_xla_stream_annotation = "2"' in text
    bodies = re.findall(r"func.func private @compute_on\w*\(.*?\n  }", text, re.S)
    assert len(bodies) == 1 and re.search(r"\bcall @", bodies[0]) is None


def test_bad_stream():
    with pytest.raises(ValueError, match="stream must be an int >= 1"):
        on_stream(_fn, 0)
