"""add_layer_norm (Pallas Triton, interpret mode on the CPU) against its reference and the
model's LayerNorm, its lowering for Hopper, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dejavu_jax import model as M
from pallas_kernels import layer_norm as ln

from kernel_testutil import assert_close, pretend_hopper

SLOW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(b=st.integers(1, 4), d=st.integers(1, 1500), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       delta_f32=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2**16),
       offset=st.sampled_from([0.0, 30.0]))
def test_matches_reference(b, d, dtype, delta_f32, bias, seed, offset):
    """Random widths (not powers of 2), residuals off-centre, delta in x's dtype or f32, with or
    without a bias: x_new equals the reference's bit for bit (the same rounding), h within the
    dtype's rounding."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, d)) * 3 + offset, dtype)
    delta = jnp.asarray(rng.standard_normal((b, d)), jnp.float32 if delta_f32 else dtype)
    scale, shift = (jnp.asarray(rng.standard_normal(d), dtype) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal(d), dtype) if bias else None
    x_new, h = ln.add_layer_norm(x, delta, scale, shift, 1e-5, bias=bias, impl="triton")
    want_x, want_h = ln.add_layer_norm_reference(x, delta, scale, shift, 1e-5, bias)
    assert x_new.dtype == h.dtype == dtype and h.shape == (b, d)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(want_x, np.float32))
    assert_close(h, want_h, dtype, f"h b={b} d={d}")


def test_reference_is_the_models_layer_norm():
    """The reference is `dejavu_jax.model.layer_norm` of x + delta, bit for bit."""
    rng = np.random.default_rng(0)
    x, delta = (jnp.asarray(rng.standard_normal((2, 96)), jnp.bfloat16) for _ in range(2))
    p = {"scale": jnp.asarray(rng.standard_normal(96), jnp.bfloat16),
         "bias": jnp.asarray(rng.standard_normal(96), jnp.bfloat16)}
    x_new, h = ln.add_layer_norm_reference(x, delta, p["scale"], p["bias"], 1e-5)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(x + delta, np.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(M.layer_norm(p, x + delta), np.float32))
    # a bias joins delta in f32 before the one rounding, as XLA rounds a sublayer's biased output
    b, d32 = p["bias"], delta.astype(jnp.float32) * 1.001
    x_b, _ = ln.add_layer_norm_reference(x, d32, p["scale"], p["bias"], 1e-5, b)
    np.testing.assert_array_equal(np.asarray(x_b, np.float32), np.asarray(x + (d32 + b.astype(jnp.float32)).astype(x.dtype), np.float32))


def test_lowers_to_triton_for_hopper(monkeypatch):
    pretend_hopper(monkeypatch)
    S = jax.ShapeDtypeStruct
    for d in (5120, 7168, 12288):
        bf = jnp.bfloat16
        fn = lambda x, dl, s, t: ln._add_layer_norm_triton(x, dl, s, t, eps=1e-5, interpret=False)  # noqa: E731
        text = jax.jit(fn).trace(S((1, d), bf), S((1, d), bf), S((d,), bf), S((d,), bf)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "dejavu_add_layer_norm" in text


def test_bad_input():
    x = jnp.zeros((1, 8))
    with pytest.raises(ValueError, match="delta must have shape"):
        ln.add_layer_norm(x, jnp.zeros((1, 9)), jnp.ones(8), jnp.zeros(8))
    with pytest.raises(ValueError, match="scale must have shape"):
        ln.add_layer_norm(x, x, jnp.ones(7), jnp.zeros(8))
    with pytest.raises(TypeError, match="dtype"):
        ln.add_layer_norm(x.astype(jnp.int32), x, jnp.ones(8), jnp.zeros(8))
    with pytest.raises(ValueError, match="bias must have shape"):
        ln.add_layer_norm(x, x, jnp.ones(8), jnp.zeros(8), bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="eps must be positive"):
        ln.add_layer_norm(x, x, jnp.ones(8), jnp.zeros(8), 0.0)
    with pytest.raises(ValueError, match="impl"):
        ln.add_layer_norm(x, x, jnp.ones(8), jnp.zeros(8), impl="cuda")
    # auto on a CPU: the reference, no kernel in the program
    text = jax.jit(lambda x: ln.add_layer_norm(x, x, jnp.ones(8), jnp.zeros(8))).lower(x).as_text()
    assert "dejavu_add_layer_norm" not in text


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), d=st.sampled_from([512, 1024, 1536]), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       bias=st.booleans(), pdl=st.booleans(), seed=st.integers(0, 2**16))
def test_mosaic_kernel_matches_reference(b, d, dtype, bias, pdl, seed):
    """The Mosaic GPU kernel (GPU interpreter on the CPU; `PDL` changes nothing there): x_new bit
    for bit, h within the dtype's rounding, delta in f32 as the decode step passes it."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, d)) * 3 + 20.0, dtype)
    delta = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    scale, shift = (jnp.asarray(rng.standard_normal(d), dtype) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal(d), dtype) if bias else None
    x_new, h = ln._add_layer_norm_mosaic(x, delta, scale, shift, bias, eps=1e-5, interpret=True, pdl=pdl)
    want_x, want_h = ln.add_layer_norm_reference(x, delta, scale, shift, 1e-5, bias)
    assert x_new.dtype == h.dtype == dtype
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(want_x, np.float32))
    assert_close(h, want_h, dtype, f"mosaic h b={b} d={d}")


def test_mosaic_impl_routes_and_falls_back(monkeypatch):
    """impl="mosaic": the Mosaic kernel where it applies (d a multiple of 512, one delta), else
    the Triton kernel (a width of 96, f32 copies of a sum): the same results either way."""
    calls = []
    real = ln._add_layer_norm_mosaic
    monkeypatch.setattr(ln, "_add_layer_norm_mosaic", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(3)
    for d, copies in ((512, 0), (96, 0), (512, 2)):
        x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
        delta = jnp.asarray(rng.standard_normal((copies, 1, d) if copies else (1, d)), jnp.float32)
        s, t = jnp.ones(d), jnp.zeros(d)
        got = ln.add_layer_norm(x, delta, s, t, impl="mosaic")
        want = ln.add_layer_norm_reference(x, delta, s, t)
        assert_close(got[1], want[1], jnp.float32, f"d={d} copies={copies}")
    assert len(calls) == 1  # only d = 512 with one delta
    assert ln.mosaic_supported(jnp.zeros((1, 5120)), jnp.zeros((1, 5120)))
    assert not ln.mosaic_supported(jnp.zeros((1, 5120)), jnp.zeros((3, 1, 5120)))


@pytest.mark.parametrize("pdl", [False, True])
def test_mosaic_kernel_lowers_for_hopper(pdl):
    """At the OPT-13B / 30B widths the Mosaic kernel lowers on the CPU; with `PDL` it lets its
    dependents launch, waits for the kernel before it, and is marked for a PDL launch."""
    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16
    for d in (5120, 7168):
        fn = lambda x, dl, b, s, t: ln._add_layer_norm_mosaic(x, dl, s, t, b, eps=1e-5, interpret=False,  # noqa: E731
                                                              pdl=pdl)
        text = jax.jit(fn).trace(S((1, d), bf), S((1, d), jnp.float32), S((d,), bf), S((d,), bf),
                                 S((d,), bf)).lower(lowering_platforms=("cuda",)).as_text()
        assert "dejavu_add_layer_norm_mosaic" in text
        for mark in ("griddepcontrol.wait", "griddepcontrol.launch_dependents", "mosaic_gpu.uses_pdl"):
            assert (mark in text) == pdl, mark
