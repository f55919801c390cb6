"""Dense GEMV over a weight's major axis, for the predictors' low-rank scorers, with reference.

    matvec_t(x, w, row_offset=o) == matvec_t_reference(x, w, row_offset=o)
                                 = x @ w[o : o + n]      # f32 [B, m]
    x: [B, n] (any float; rounded to w's dtype, as the XLA einsum does), w: [N, m] row-major,
    row_offset: a static int, o + n <= N. The offset reads one layer's block of a stacked
    weight ([L * n, m], a free reshape of [L, n, m]) in place: a slice passed to a custom call
    would be copied first.

Why: a predictor is standardize(x) [1, d] @ w1 [d, r], then h [1, r] @ w2 [r, F]. XLA lowers a
matrix-vector product that reduces over the weight's major axis as a column reduction, and with
r = 256-512 output columns that leaves most of an H100 idle: 0.10-0.32 of the peak read bandwidth
for the predictors at OPT-13B/30B shapes (benchmarks/results/layer_kernels.json; at OPT-30B the
MLP predictor took 64 us a layer, more than the sparse MLP it feeds). The Triton kernel
(`_triton_gemv.gather_matvec_t` with the identity row map) gives each program a run of rows and
one column tile, accumulates in f32, and XLA sums the programs' partials.

Backends (`impl`): "triton", "xla" (the reference einsum), "auto" (what `pallas_kernels.dispatch`
names for "matvec_t": Triton on Hopper at batch 1, XLA elsewhere). On the CPU the Triton kernel
runs in interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _common as c
from pallas_kernels import _triton_gemv as tg


def matvec_t_reference(x: jax.Array, w: jax.Array, *, row_offset: int = 0, impl: str = "xla",
                       tuning=None) -> jax.Array:
  """x [B, n] @ w[row_offset : row_offset + n] -> f32 [B, m]; x rounded to w's dtype, f32
  accumulation."""
  del impl, tuning
  w = jax.lax.slice_in_dim(w, row_offset, row_offset + x.shape[1])
  return jnp.einsum("bn,nm->bm", x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def auto_tuning(batch: int, n: int, m: int, sms: int | None = None, block_d: int = 512) -> tg.GemvTuning:
  """8 rows x 512 columns per tile (4 warps) at batch 1, the row runs split so that
  (splits x column tiles) gives about two programs per SM."""
  sms = sms or c.num_sms()
  bk = 8 if batch == 1 else 16
  bd = min(block_d, c.next_pow2(m))
  want = c.cdiv(2 * sms, c.cdiv(m, bd))
  return tg.GemvTuning(block_k=bk, block_d=bd, splits=max(1, min(c.cdiv(n, bk), want)),
                       num_warps=4 if batch == 1 else 8)


def matvec_t(x: jax.Array, w: jax.Array, *, row_offset: int = 0, impl: str = "auto",
             tuning: tg.GemvTuning | None = None) -> jax.Array:
  """x [B, n] @ w[row_offset : row_offset + n] -> f32 [B, m] (see the module docstring)."""
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES)
  c.check_array("w", w, ndim=2, dtypes=c.FLOAT_DTYPES, hint="w is [N, m]: rows row_offset.. row_offset + n.")
  n = x.shape[1]
  if not isinstance(row_offset, int) or row_offset < 0 or row_offset + n > w.shape[0]:
    raise ValueError(f"rows [{row_offset}, {row_offset} + {n}) must lie in w's {w.shape[0]} rows "
                     "(row_offset: a static int >= 0).")
  impl = c.resolve_impl(impl, "matvec_t", x.shape[0], ("auto", "triton", "xla"))
  if not 1 <= x.shape[0] <= 64:
    raise ValueError(f"x has batch {x.shape[0]}; the kernel takes 1 to 64 rows.")
  if impl == "xla":
    return matvec_t_reference(x, w, row_offset=row_offset)
  m = w.shape[1]
  t = tuning or auto_tuning(x.shape[0], n, m)
  part = tg.gather_matvec_t(x.astype(w.dtype), w, jnp.zeros((1,), jnp.int32), jnp.full((1,), n, jnp.int32),
                            k=n, tuning=t, rowmap=("identity", row_offset), interpret=c.on_cpu())
  return part.sum(0)
