"""Triton-lowered Pallas kernels for gathered-row GEMV/GEMM (small batch).

Three kernels, all reading only the selected rows of a row-major [n_rows, d] weight:

* `fused_mlp_partials`: relu(x @ w1[rows].T + b1[rows]) @ w2t[rows] per neuron block;
  the hidden activations stay in registers; each program writes one partial output
  [B_pad, d] (f32) that the caller sums (or adds atomically into one [B_pad, d]).
* `gather_matvec_partials`: x @ w[rows].T over a split of the d columns -> [splits, B_pad, k].
* `gather_matvec_t_partials`: h @ w[rows] over a split of the selected rows -> [splits, B_pad, d].

Batch 1 uses CUDA-core FMAs with an elementwise f32 accumulator reduced once at the
end; larger batches pad B to >= 16 rows and use `pl.dot` (tensor cores), with the
hidden activations rounded to the weight dtype. Each loop step prefetches the next
tile before using the current one, so two tiles per program are in flight.
Positions >= count are masked: their rows are never read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._common import cdiv


@dataclasses.dataclass(frozen=True)
class GemvTuning:
  """Block sizes of the Triton gathered GEMV kernels.

  block_k: rows (neurons) per tile, a power of 2 (>= 16 on the dot path).
  block_d: columns per tile, a power of 2.
  splits: programs along the other axis (0 = pick from the shape).
  num_warps / num_stages: Triton launch parameters.
  """
  block_k: int = 16
  block_d: int = 512
  splits: int = 0
  num_warps: int = 4
  num_stages: int = 1


def use_dot(batch: int) -> bool:
  return batch > 1


def padded_batch(batch: int) -> int:
  if not use_dot(batch):
    return 1
  return max(16, 1 << (batch - 1).bit_length())


def _params(t: GemvTuning):
  return pltr.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def _load_rows(ref, rows, row_ok, c, block_d, d, *, extra_ok=None):
  """Tile [len(rows), block_d] of `ref` at columns c*block_d.., zeros where masked."""
  cols = c * block_d + jnp.arange(block_d)
  ok = row_ok[:, None]
  if d % block_d:
    ok = ok & (cols < d)[None, :]
  if extra_ok is not None:
    ok = ok & extra_ok
  ok = jnp.broadcast_to(ok, (rows.shape[0], block_d))
  return pltr.load(ref.at[rows[:, None], cols[None, :]], mask=ok, other=0)


def _load_x(x_ref, c, block_d, d, bp):
  if d % block_d:
    cols = c * block_d + jnp.arange(block_d)
    ok = jnp.broadcast_to((cols < d)[None, :], (bp, block_d))
    return pltr.load(x_ref.at[:, pl.ds(c * block_d, block_d)], mask=ok, other=0)
  return x_ref[:, pl.ds(c * block_d, block_d)]


def _store_cols(ref_at, val, c, block_d, d):
  if d % block_d:
    cols = c * block_d + jnp.arange(block_d)
    ok = jnp.broadcast_to((cols < d)[None, :], val.shape)
    pltr.store(ref_at, val, mask=ok)
  else:
    ref_at[...] = val


def _row_block(idx_ref, count_ref, start, block_k):
  count = count_ref[0]
  ok = start + jnp.arange(block_k) < count
  rows = jnp.where(ok, idx_ref[pl.ds(start, block_k)], 0)
  return rows, ok


def _project(x_ref, w_ref, rows, ok, c_lo, c_hi, *, block_d, d, bp, dot):
  """sum over column tiles [c_lo, c_hi) of x @ w[rows].T -> [bp, block_k] f32."""
  block_k = rows.shape[0]

  def tile(c, more=None):
    return _load_rows(w_ref, rows, ok, c, block_d, d,
                      extra_ok=None if more is None else more)

  def body(c, carry):
    acc, w = carry
    nxt = tile(jnp.minimum(c + 1, c_hi - 1), more=c + 1 < c_hi)  # prefetch
    xc = _load_x(x_ref, c, block_d, d, bp)
    if dot:
      acc = acc + pltr.dot(xc.astype(w.dtype), w, trans_b=True)
    else:
      acc = acc + w.astype(jnp.float32) * xc.astype(jnp.float32)
    return acc, nxt

  acc0 = (jnp.zeros((bp, block_k), jnp.float32) if dot
          else jnp.zeros((block_k, block_d), jnp.float32))
  acc, _ = lax.fori_loop(c_lo, c_hi, body, (acc0, tile(c_lo)))
  if not dot:
    acc = jnp.sum(acc, axis=1)[None, :]
  return acc


def _fused_kernel(count_ref, idx_ref, x_ref, w1_ref, b1_ref, w2_ref, mask_ref, out_ref, *,
                  block_k, block_d, d, bp, dot, has_mask, atomic):
  p = pl.program_id(0)
  start = p * block_k
  rows, ok = _row_block(idx_ref, count_ref, start, block_k)
  n_chunks = cdiv(d, block_d)
  pre = _project(x_ref, w1_ref, rows, ok, 0, n_chunks, block_d=block_d, d=d, bp=bp, dot=dot)
  b1 = pltr.load(b1_ref.at[rows], mask=ok, other=0).astype(jnp.float32)
  h = jnp.maximum(pre + b1[None, :], 0.0)
  h = jnp.where(ok[None, :], h, 0.0)
  if has_mask:
    h = h * mask_ref[:, pl.ds(start, block_k)].astype(jnp.float32)

  def out_tile(c, w2):
    if dot:
      return pltr.dot(h.astype(w2.dtype), w2)  # [bp, block_d]
    return jnp.sum(h.reshape(block_k, 1) * w2.astype(jnp.float32), axis=0)[None, :]

  def body(c, w2):
    nxt = _load_rows(w2_ref, rows, ok, jnp.minimum(c + 1, n_chunks - 1), block_d, d,
                     extra_ok=c + 1 < n_chunks)
    val = out_tile(c, w2)
    if atomic:  # d % block_d == 0 is required by the caller
      pltr.atomic_add(out_ref, (slice(None), pl.ds(c * block_d, block_d)), val)
    else:
      _store_cols(out_ref.at[p, :, pl.ds(c * block_d, block_d)], val, c, block_d, d)
    return nxt

  lax.fori_loop(0, n_chunks, body, _load_rows(w2_ref, rows, ok, 0, block_d, d))


def _auto_block_k(k_pad: int, dot: bool, sms: int) -> int:
  """Largest power-of-2 block (<= 64) that still gives >= ~1.5 programs per SM."""
  lo = 16 if dot else 4
  b = 64
  while b > lo and cdiv(k_pad, b) < 1.5 * sms:
    b //= 2
  return b


@functools.partial(jax.jit, static_argnames=("tuning", "atomic", "interpret"))
def fused_mlp_partials(x, w1, b1, w2t, idx, count, mask, *, tuning: GemvTuning,
                       atomic: bool = False, interpret: bool = False):
  """x: [bp, d] (bp = padded_batch), idx: [k_pad] int32 (k_pad % block_k == 0),
  count: [1] int32, mask: [bp, k_pad] or None. Returns f32 [P, bp, d] partials
  (or [bp, d] when atomic=True; the caller adds b2)."""
  bp, d = x.shape
  k_pad = idx.shape[0]
  dot = bp > 1
  bk = tuning.block_k
  assert k_pad % bk == 0, (k_pad, bk)
  assert not atomic or d % tuning.block_d == 0, (d, tuning.block_d)
  n_prog = k_pad // bk
  has_mask = mask is not None
  if mask is None:
    mask = jnp.zeros((1, 1), jnp.float32)
  out_shape = (jax.ShapeDtypeStruct((bp, d), jnp.float32) if atomic
               else jax.ShapeDtypeStruct((n_prog, bp, d), jnp.float32))
  kernel = functools.partial(_fused_kernel, block_k=bk, block_d=tuning.block_d, d=d, bp=bp,
                             dot=dot, has_mask=has_mask, atomic=atomic)
  extra = {}
  args = [count, idx, x, w1, b1, w2t, mask]
  if atomic:
    args.append(jnp.zeros((bp, d), jnp.float32))
    extra = dict(input_output_aliases={len(args) - 1: 0})
    kernel = _drop_alias_input(kernel)
  return pl.pallas_call(kernel, out_shape=out_shape, grid=(n_prog,),
                        compiler_params=_params(tuning), interpret=interpret,
                        name="dejavu_fused_mlp", **extra)(*args)


def _drop_alias_input(kernel):
  def wrapped(*refs):
    *ins, _alias_in, out = refs
    return kernel(*ins, out)
  return wrapped


def _matvec_kernel(count_ref, idx_ref, x_ref, w_ref, out_ref, *, block_k, block_d, d, bp,
                   dot, per_split):
  p, q = pl.program_id(0), pl.program_id(1)
  rows, ok = _row_block(idx_ref, count_ref, p * block_k, block_k)
  n_chunks = cdiv(d, block_d)
  c_lo = q * per_split
  c_hi = jnp.minimum(c_lo + per_split, n_chunks)
  acc = _project(x_ref, w_ref, rows, ok, c_lo, c_hi, block_d=block_d, d=d, bp=bp, dot=dot)
  out_ref[q, :, pl.ds(p * block_k, block_k)] = acc


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def gather_matvec_partials(x, w, idx, count, *, tuning: GemvTuning, interpret: bool = False):
  """Partial x @ w[idx].T: x [bp, d], w [n, d], idx [k_pad] -> f32 [splits, bp, k_pad]."""
  bp, d = x.shape
  k_pad = idx.shape[0]
  bk, bd = tuning.block_k, tuning.block_d
  n_chunks = cdiv(d, bd)
  splits = tuning.splits or 1
  splits = max(1, min(splits, n_chunks))
  per_split = cdiv(n_chunks, splits)
  splits = cdiv(n_chunks, per_split)
  kernel = functools.partial(_matvec_kernel, block_k=bk, block_d=bd, d=d, bp=bp,
                             dot=bp > 1, per_split=per_split)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, bp, k_pad), jnp.float32),
      grid=(k_pad // bk, splits), compiler_params=_params(tuning), interpret=interpret,
      name="dejavu_gather_matvec")(count, idx, x, w)


def _matvec_t_kernel(count_ref, idx_ref, h_ref, w_ref, out_ref, *, block_k, block_d, d, bp,
                     dot, per_split):
  p, q = pl.program_id(0), pl.program_id(1)
  count = count_ref[0]
  n_sub = per_split  # row blocks handled by this program

  def sub(i):
    start = (p * n_sub + i) * block_k
    ok = start + jnp.arange(block_k) < count
    rows = jnp.where(ok, idx_ref[pl.ds(start, block_k)], 0)
    return start, rows, ok

  def load(i, more=None):
    start, rows, ok = sub(i)
    return _load_rows(w_ref, rows, ok, q, block_d, d, extra_ok=more)

  def body(i, carry):
    acc, w = carry
    nxt = load(jnp.minimum(i + 1, n_sub - 1), more=i + 1 < n_sub)
    start, _, _ = sub(i)
    hb = h_ref[:, pl.ds(start, block_k)]  # [bp, block_k]
    if dot:
      acc = acc + pltr.dot(hb.astype(w.dtype), w)
    else:
      acc = acc + hb.reshape(block_k, 1).astype(jnp.float32) * w.astype(jnp.float32)
    return acc, nxt

  acc0 = (jnp.zeros((bp, block_d), jnp.float32) if dot
          else jnp.zeros((block_k, block_d), jnp.float32))
  acc, _ = lax.fori_loop(0, n_sub, body, (acc0, load(0)))
  if not dot:
    acc = jnp.sum(acc, axis=0)[None, :]
  _store_cols(out_ref.at[p, :, pl.ds(q * block_d, block_d)], acc, q, block_d, d)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def gather_matvec_t_partials(h, w, idx, count, *, tuning: GemvTuning, interpret: bool = False):
  """Partial h @ w[idx]: h [bp, k_pad] (zero past count), w [n, d] -> f32 [splits, bp, d]."""
  bp, k_pad = h.shape
  d = w.shape[1]
  bk, bd = tuning.block_k, tuning.block_d
  n_blocks = k_pad // bk
  splits = max(1, min(tuning.splits or 1, n_blocks))
  per_split = cdiv(n_blocks, splits)
  splits = cdiv(n_blocks, per_split)
  if splits * per_split != n_blocks:  # pad rows so every program has per_split blocks
    extra = (splits * per_split - n_blocks) * bk
    idx = jnp.pad(idx, (0, extra))
    h = jnp.pad(h, ((0, 0), (0, extra)))
  kernel = functools.partial(_matvec_t_kernel, block_k=bk, block_d=bd, d=d, bp=bp,
                             dot=bp > 1, per_split=per_split)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, bp, d), jnp.float32),
      grid=(splits, cdiv(d, bd)), compiler_params=_params(tuning), interpret=interpret,
      name="dejavu_gather_matvec_t")(count, idx, h, w)
