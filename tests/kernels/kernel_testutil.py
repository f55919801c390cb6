"""Helpers for the kernel tests: random inputs and a relative-norm error check."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

# Relative norm error allowed, by dtype of the inputs: f32 paths are exact up to
# summation order; bf16 paths round x / h to bf16 (dot path) and the output to bf16.
TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def rel_err(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  assert np.all(np.isfinite(out)), "non-finite output"
  denom = max(np.linalg.norm(ref), 1e-30)
  return float(np.linalg.norm(out - ref) / denom)


def assert_close(out, ref, dtype, what=""):
  err = rel_err(out, ref)
  tol = TOL[jnp.dtype(dtype)]
  assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def mlp_inputs(rng, b, d, d_ff, k, dtype, biases=True):
  """x [b, d], w1/w2t [d_ff, d], b1 [d_ff], b2 [d], idx [k] (unsorted, unique)."""
  s = 1.0 / np.sqrt(d)
  x = jnp.asarray(rng.standard_normal((b, d)), dtype)
  w1 = jnp.asarray(rng.standard_normal((d_ff, d)) * s, dtype)
  w2t = jnp.asarray(rng.standard_normal((d_ff, d)) * s, dtype)
  b1 = jnp.asarray(rng.standard_normal(d_ff) * 0.5, dtype) if biases else None
  b2 = jnp.asarray(rng.standard_normal(d) * 0.5, dtype) if biases else None
  idx = jnp.asarray(rng.permutation(d_ff)[:k], jnp.int32)
  return x, w1, b1, w2t, b2, idx


def pretend_hopper(monkeypatch) -> None:
  """Let Pallas' Triton lowering run on a CPU as for an H100 (sm_90): the lowering asks the
  GPU for its compute capability, so it gets a stand-in device record. Skips where this JAX
  finds the GPU another way."""
  import pytest

  reg = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  if not hasattr(reg, "gpu_info_lib"):
    pytest.skip("this JAX finds the GPU another way")

  class Hopper:
    compute_capability = "9.0"

  monkeypatch.setattr(reg.gpu_info_lib, "get_gpu_info", lambda: Hopper())


SETS_TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # of a predictor score, relative to the largest |score| + 1


def random_predictor(key, L, d, r, n, dtype):
  """A stacked low-rank predictor (w1 [L, d, r], w2 [L, r, n], b2 [L, n]) with unit-scale scores."""
  import jax
  k1, k2, k3 = jax.random.split(key, 3)
  return (jax.random.normal(k1, (L, d, r), dtype) / np.sqrt(d), jax.random.normal(k2, (L, r, n), dtype) / np.sqrt(r),
          jax.random.normal(k3, (L, n), dtype))


def draw_sets_problem(data, L, d, rm, rh, f, h, dtype, thresholds):
  """A hypothesis-drawn batch-1 sets problem: (x [1, d] off-centre, mlp and head predictors,
  layer, threshold from ``thresholds``, mlp_k, head_k)."""
  import jax
  from hypothesis import strategies as st
  key = jax.random.key(data.draw(st.integers(0, 2**31 - 1)))
  mlp = random_predictor(jax.random.fold_in(key, 1), L, d, rm, f, dtype)
  head = random_predictor(jax.random.fold_in(key, 2), L, d, rh, h, dtype)
  x = (3.0 * jax.random.normal(jax.random.fold_in(key, 3), (1, d)) + 0.5).astype(dtype)
  layer = data.draw(st.integers(0, L - 1))
  threshold = data.draw(st.sampled_from(thresholds))
  return x, mlp, head, layer, threshold, data.draw(st.integers(1, f)), data.draw(st.integers(1, h))
