"""The kernel benchmark's inputs and its correctness check (scripts/bench_kernels.py): weight
copies that defeat the L2, and every timed variant against the jnp references before timing."""

from __future__ import annotations

import math
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from bench_kernels_report import log
from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_mlp as sm

L2_BYTES = 50 * 2**20
# (d, batch, density) and (d, batch, heads kept, cache length) checked; --smoke makes them tiny
CHECK_MLP = [(2048, 1, 0.1), (5120, 1, 0.05), (2048, 4, 0.2), (4096, 16, 0.1), (2048, 64, 0.3)]
CHECK_ATTN = [(2048, 1, 0.5, 1000), (4096, 4, 0.25, 512)]


class MLPInputs:
  """Weight copies for one d_model (enough that the rotation defeats the L2)."""

  def __init__(self, d, dtype=jnp.bfloat16, n_sets=None):
    self.d, self.d_ff = d, 4 * d
    per_set = 2 * self.d_ff * d * jnp.dtype(dtype).itemsize
    self.n_sets = n_sets or max(2, min(6, math.ceil(6 * L2_BYTES / per_set)))
    key = jax.random.key(d)
    self.sets = []
    for s in range(self.n_sets):
      k1, k2, k3, k4, key = jax.random.split(key, 5)
      scale = 1.0 / math.sqrt(d)
      w1 = (jax.random.normal(k1, (self.d_ff, d), jnp.float32) * scale).astype(dtype)
      w2t = (jax.random.normal(k2, (self.d_ff, d), jnp.float32) * scale).astype(dtype)
      b1 = (jax.random.normal(k3, (self.d_ff,), jnp.float32) * 0.1).astype(dtype)
      b2 = (jax.random.normal(k4, (d,), jnp.float32) * 0.1).astype(dtype)
      self.sets.append((w1, b1, w2t, b2))
    jax.block_until_ready(self.sets)

  def xs_idx(self, batch, k, n, seed=0):
    rng = np.random.default_rng(seed + 7 * k + batch)
    xs = [jnp.asarray(rng.standard_normal((batch, self.d)), jnp.bfloat16) for _ in range(n)]
    idx = [jnp.asarray(rng.permutation(self.d_ff)[:k], jnp.int32) for _ in range(n)]
    return xs, idx



def rel_err(out, ref):
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  if not np.all(np.isfinite(out)):
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def check_correctness(variants):
  """Returns {variant name: ok}. bf16 tolerance 2e-2 relative norm error."""
  ok = {}
  rng = np.random.default_rng(0)
  for d, b, dens in CHECK_MLP:
    inp = MLPInputs(d, n_sets=1)
    w1, b1, w2t, b2 = inp.sets[0]
    k = int(dens * inp.d_ff) + 3  # not a block multiple
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.bfloat16)
    idx = jnp.asarray(rng.permutation(inp.d_ff)[:k], jnp.int32)
    count = jnp.int32(k - 5)
    ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count)
    mask = jnp.asarray(rng.random((b, k)) < 0.6)
    ref_m = sm.sparse_mlp_masked_reference(x, w1, b1, w2t, b2, idx, mask, count=count)
    for name, fn in variants.items():
      try:
        out = fn(x, w1, b1, w2t, b2, idx, count, None)
        err = rel_err(out, ref)
        out_m = fn(x, w1, b1, w2t, b2, idx, count, mask)
        err_m = rel_err(out_m, ref_m)
        good = err < 2e-2 and err_m < 2e-2
      except Exception as e:  # noqa: BLE001 - report and keep going
        err = err_m = float("nan")
        good = False
        log(f"  [{name}] d={d} B={b} raised {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if os.environ.get("BENCH_TRACEBACK"):
          traceback.print_exc()
      ok[name] = ok.get(name, True) and good
      log(f"check sparse_mlp {name:24s} d={d:5d} B={b:2d} k={k:5d} err={err:.2e} "
          f"masked={err_m:.2e} {'ok' if good else 'FAIL'}")
    del inp
  # attention kernels
  for d, b, keep, seq in CHECK_ATTN:
    n_heads, hd = d // 128, 128
    k_h = max(1, int(keep * n_heads))
    key = jax.random.key(3)
    ks = jax.random.split(key, 8)
    x = jax.random.normal(ks[0], (b, d), jnp.bfloat16)
    wqkv = (jax.random.normal(ks[1], (3, n_heads, hd, d)) / math.sqrt(d)).astype(jnp.bfloat16)
    bqkv = jax.random.normal(ks[2], (3, n_heads, hd)).astype(jnp.bfloat16)
    wo = (jax.random.normal(ks[3], (n_heads, hd, d)) / math.sqrt(d)).astype(jnp.bfloat16)
    heads = jnp.asarray(rng.permutation(n_heads)[:k_h], jnp.int32)
    o = jax.random.normal(ks[4], (b, k_h, hd), jnp.bfloat16)
    q = (jax.random.normal(ks[5], (b, k_h, hd)) / math.sqrt(hd)).astype(jnp.bfloat16)
    kc = jax.random.normal(ks[6], (b, n_heads, seq, hd), jnp.bfloat16)
    vc = jax.random.normal(ks[7], (b, n_heads, seq, hd), jnp.bfloat16)
    kvm = jnp.asarray(rng.random((b, seq)) < 0.8)
    cases = {
        "qkv": (lambda impl: sa.head_sparse_qkv(x, wqkv, bqkv, heads, impl=impl)),
        "q_only": (lambda impl: sa.head_sparse_qkv(x, wqkv, bqkv, heads, which=(0,), impl=impl)),
        "out": (lambda impl: sa.head_sparse_out(o, wo, bqkv[0, 0, :1].repeat(d), heads, impl=impl)),
        "attn": (lambda impl: sa.head_sparse_decode_attention(q, kc, vc, heads, kvm, impl=impl)),
    }
    for name, fn in cases.items():
      ref = fn("reference")
      for impl in ("triton", "xla"):
        try:
          err = rel_err(fn(impl), ref)
        except Exception as e:  # noqa: BLE001
          err = float("nan")
          log(f"  [{name}/{impl}] raised {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        good = err < 2e-2
        ok[f"{name}/{impl}"] = ok.get(f"{name}/{impl}", True) and good
        log(f"check {name:8s} {impl:7s} d={d} B={b} heads={k_h}/{n_heads} err={err:.2e} "
            f"{'ok' if good else 'FAIL'}")
  return ok
