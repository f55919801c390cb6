"""Triton-lowered Pallas kernels for gathered-row GEMV/GEMM (batch 1..64).

All kernels read only the selected rows of a row-major [n_rows, d] weight, take the raw
inputs (x/h in any float dtype, idx of any length k, count clamped in-kernel), and
write only the B real batch rows, so a call needs no padding or casting kernels:

* `fused_mlp_partials`: relu(x @ w1[rows].T + b1[rows]) @ w2t[rows] per neuron block;
  the hidden activations stay in registers; each program writes one f32 [B, d] partial.
* `gather_matvec`: x @ w[rows].T, columns split over programs -> f32 [splits, B, k];
  with one split it can finish in-kernel (bias, ReLU, output dtype) -> [B, k].
* `gather_matvec_t`: h @ w[rows], neurons split over programs -> f32 [splits, B, d]; h is
  either given [B, k] or rebuilt per tile as relu(sum of fc1 partials + b1) * mask.

* `_triton_q_kv.gather_matvec_q_kv_cache` (its own module) builds on these helpers.

Row maps: "idx" (rows = idx[pos]); "identity" (rows = offset + pos, idx unread); "qkv"
(pos -> (which[t] * H + heads[i]) * hd + r for the [len(which), k_h, hd] positions); "heads"
(pos -> heads[pos // hd] * hd + pos % hd).
Batch 1 uses CUDA-core FMAs; larger batches pad to >= 16 rows in registers and use a
tensor-core dot. Each loop step loads the next tile before using the current one.
Positions >= count are masked and their rows never read.
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
  """block_k rows per tile (power of 2, <= 16 at batch 1, >= 16 batched); block_d
  columns per tile (power of 2); splits along the other axis; Triton launch params."""
  block_k: int = 16
  block_d: int = 512
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 1


def padded_batch(batch: int) -> int:
  return 1 if batch == 1 else max(16, 1 << (batch - 1).bit_length())


def auto_block_k(k: int, batch: int, sms: int) -> int:
  """Largest power-of-2 block giving >= ~1.5 programs per SM (<= 16 at batch 1, where
  the f32 elementwise accumulator would spill beyond that; >= 16 for the dot path)."""
  if batch > 1:
    b = 64
    while b > 16 and cdiv(k, b) < 1.5 * sms:
      b //= 2
    return b
  b = 16
  while b > 4 and cdiv(k, b) < 1.5 * sms:
    b //= 2
  return b


def _params(t: GemvTuning):
  return pltr.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


# ----------------------------------------------------------------------------- helpers


def _clamped_count(count_ref, k):
  return jnp.clip(count_ref[0], 0, k)


def _rows(idx_ref, pos, ok, rowmap):
  """Weight rows of logical positions `pos` (masked positions give row 0)."""
  kind = rowmap[0]
  if kind == "idx":
    rows = pltr.load(idx_ref.at[pos], mask=ok, other=0)
  elif kind == "qkv":
    _, which, n_heads, hd, k_h = rowmap
    t_sel = pos // (k_h * hd)
    head = pltr.load(idx_ref.at[(pos // hd) % k_h], mask=ok, other=0)
    t = jnp.full(pos.shape, which[0], jnp.int32)
    for j, w in enumerate(which[1:], start=1):
      t = jnp.where(t_sel == j, w, t)
    rows = (t * n_heads + head) * hd + pos % hd
  elif kind == "identity":  # rows = positions + a static offset (a dense block of rows)
    rows = pos + rowmap[1]
  elif kind == "heads":
    hd = rowmap[1]
    head = pltr.load(idx_ref.at[pos // hd], mask=ok, other=0)
    rows = head * hd + pos % hd
  else:
    raise ValueError(rowmap)
  return jnp.where(ok, rows, 0)


def _block(idx_ref, count, start, block_k, rowmap):
  pos = start + jnp.arange(block_k)
  ok = pos < count
  return pos, _rows(idx_ref, pos, ok, rowmap), ok


def _load_rows(ref, rows, row_ok, c, block_d, d, more=None):
  """Tile [len(rows), block_d] of `ref` at columns c*block_d.., zeros where masked."""
  cols = c * block_d + jnp.arange(block_d)
  ok = row_ok[:, None]
  if d % block_d:
    ok = ok & (cols < d)[None, :]
  if more is not None:
    ok = ok & more
  ok = jnp.broadcast_to(ok, (rows.shape[0], block_d))
  return pltr.load(ref.at[rows[:, None], cols[None, :]], mask=ok, other=0)


def _load_batch(ref, b, bp, cols, col_ok, lead=()):
  """[bp, len(cols)] rows 0..b-1 of a [*lead, b, n] ref at `cols`, zero-padded to bp rows."""
  r = jnp.arange(bp)
  ok = jnp.broadcast_to((r < b)[:, None] & col_ok[None, :], (bp, cols.shape[0]))
  return pltr.load(ref.at[(*lead, r[:, None], cols[None, :])], mask=ok, other=0)


def _store_batch(ref, val, b, cols, col_ok, lead=()):
  """Store rows 0..b-1 of val [bp, n] into a [*lead, b, n] ref at `cols`."""
  bp = val.shape[0]
  r = jnp.arange(bp)
  ok = jnp.broadcast_to((r < b)[:, None] & col_ok[None, :], val.shape)
  pltr.store(ref.at[(*lead, r[:, None], cols[None, :])], val, mask=ok)


def _add_batch(ref, val, cols):
  """Atomically add val [b, n] into a [b, n] f32 ref at `cols` (all in bounds: no mask, which
  Pallas' interpret mode cannot discharge; see `atomic_fits`)."""
  r = jnp.arange(val.shape[0])
  pltr.atomic_add(ref, (r[:, None], cols[None, :]), val)


def atomic_fits(b: int, d: int, block_d: int) -> bool:
  """Whether `gather_matvec_t(acc=)` can add its tiles atomically: every tile row and column
  in bounds (b equals its padded batch and block_d divides d)."""
  return b == padded_batch(b) and d % block_d == 0


def _cols(c, block_d, d):
  cols = c * block_d + jnp.arange(block_d)
  return cols, cols < d


def _project(x_ref, w_ref, rows, ok, c_lo, c_hi, *, block_d, d, b, bp, x_map=None):
  """sum over column tiles [c_lo, c_hi) of x @ w[rows].T -> [bp, block_k] f32; ``x_map``
  (optional) maps each loaded f32 tile of x before the product."""
  block_k = rows.shape[0]
  dot = bp > 1

  def body(c, carry):
    acc, w = carry
    nxt = _load_rows(w_ref, rows, ok, jnp.minimum(c + 1, c_hi - 1), block_d, d,
                     more=c + 1 < c_hi)  # prefetch the next tile
    cols, col_ok = _cols(c, block_d, d)
    xc = _load_batch(x_ref, b, bp, cols, col_ok)
    if x_map is not None:
      xc = x_map(xc.astype(jnp.float32))
    if dot:
      acc = acc + pltr.dot(xc.astype(w.dtype), w, trans_b=True)
    else:
      acc = acc + w.astype(jnp.float32) * xc.astype(jnp.float32)
    return acc, nxt

  acc0 = (jnp.zeros((bp, block_k), jnp.float32) if dot
          else jnp.zeros((block_k, block_d), jnp.float32))
  first = _load_rows(w_ref, rows, ok, c_lo, block_d, d, more=c_lo < c_hi)
  acc, _ = lax.fori_loop(c_lo, c_hi, body, (acc0, first))
  if not dot:
    acc = jnp.sum(acc, axis=1)[None, :]
  return acc


def _accumulate_out(h, w):
  """h [bp, bk] f32, w [bk, bd] -> [bp, bd] f32 contribution h @ w."""
  if h.shape[0] > 1:
    return pltr.dot(h.astype(w.dtype), w)
  return jnp.sum(h.reshape(h.shape[1], 1) * w.astype(jnp.float32), axis=0)[None, :]


# ----------------------------------------------------------------------------- fused MLP


def _fused_kernel(count_ref, idx_ref, x_ref, w1_ref, b1_ref, w2_ref, mask_ref, out_ref, *,
                  k, b, bp, block_k, block_d, d, has_b1, has_mask):
  p = pl.program_id(0)
  start = p * block_k
  count = _clamped_count(count_ref, k)
  pos, rows, ok = _block(idx_ref, count, start, block_k, ("idx",))
  n_chunks = cdiv(d, block_d)
  pre = _project(x_ref, w1_ref, rows, ok, 0, n_chunks, block_d=block_d, d=d, b=b, bp=bp)
  if has_b1:
    pre = pre + pltr.load(b1_ref.at[rows], mask=ok, other=0).astype(jnp.float32)[None, :]
  h = jnp.where(ok[None, :], jnp.maximum(pre, 0.0), 0.0)
  if has_mask:
    h = h * _load_batch(mask_ref, b, bp, pos, ok).astype(jnp.float32)

  def body(c, w2):
    nxt = _load_rows(w2_ref, rows, ok, jnp.minimum(c + 1, n_chunks - 1), block_d, d,
                     more=c + 1 < n_chunks)
    cols, col_ok = _cols(c, block_d, d)
    _store_batch(out_ref, _accumulate_out(h, w2), b, cols, col_ok, lead=(p,))
    return nxt

  lax.fori_loop(0, n_chunks, body, _load_rows(w2_ref, rows, ok, 0, block_d, d))


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def fused_mlp_partials(x, w1, b1, w2t, idx, count, mask, *, tuning: GemvTuning,
                       interpret: bool = False):
  """x [B, d], w1/w2t [n, d], b1 [n] or None, idx [k], count [1] int32, mask [B, k] or
  None -> f32 [cdiv(k, block_k), B, d] partial outputs (sum them, add b2)."""
  b, d = x.shape
  k = idx.shape[0]
  bk = tuning.block_k
  kernel = functools.partial(
      _fused_kernel, k=k, b=b, bp=padded_batch(b), block_k=bk, block_d=tuning.block_d, d=d,
      has_b1=b1 is not None, has_mask=mask is not None)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((cdiv(k, bk), b, d), jnp.float32),
      grid=(cdiv(k, bk),), compiler_params=_params(tuning), interpret=interpret,
      name="dejavu_fused_mlp",
  )(count, idx, x, w1, w1 if b1 is None else b1, w2t, x if mask is None else mask)


# ----------------------------------------------------------------------------- fc1-like


def _matvec_kernel(count_ref, idx_ref, x_ref, w_ref, bias_ref, out_ref, *, k, b, bp, block_k,
                   block_d, d, per_split, rowmap, epilogue):
  p, q = pl.program_id(0), pl.program_id(1)
  count = _clamped_count(count_ref, k)
  pos, rows, ok = _block(idx_ref, count, p * block_k, block_k, rowmap)
  n_chunks = cdiv(d, block_d)
  c_lo = q * per_split
  c_hi = jnp.minimum(c_lo + per_split, n_chunks)
  acc = _project(x_ref, w_ref, rows, ok, c_lo, c_hi, block_d=block_d, d=d, b=b, bp=bp)
  if epilogue is None:
    _store_batch(out_ref, acc, b, pos, pos < k, lead=(q,))
    return
  if epilogue != "none":
    acc = acc + pltr.load(bias_ref.at[rows], mask=ok, other=0).astype(jnp.float32)[None, :]
  if epilogue == "bias_relu":
    acc = jnp.maximum(acc, 0.0)
  acc = jnp.where(ok[None, :], acc, 0.0)
  _store_batch(out_ref, acc.astype(out_ref.dtype), b, pos, pos < k)


@functools.partial(jax.jit, static_argnames=("k", "tuning", "rowmap", "epilogue", "interpret"))
def gather_matvec(x, w, idx, count, bias=None, *, k: int, tuning: GemvTuning,
                  rowmap=("idx",), epilogue=None, interpret: bool = False):
  """x @ w[rows(pos)].T for pos < k: x [B, d], w [n, d], idx: row map input, count [1].
  epilogue None -> f32 [splits, B, k] partials; "none" | "bias" | "bias_relu" (one split,
  bias [n] indexed by row) -> [B, k] in x.dtype with zeros at positions >= count."""
  b, d = x.shape
  bk, bd = tuning.block_k, tuning.block_d
  n_chunks = cdiv(d, bd)
  splits = max(1, min(tuning.splits, n_chunks))
  per_split = cdiv(n_chunks, splits)
  splits = cdiv(n_chunks, per_split)
  if epilogue is not None:
    assert splits == 1, "an in-kernel epilogue needs the whole row in one program"
    out_shape = jax.ShapeDtypeStruct((b, k), x.dtype)
  else:
    out_shape = jax.ShapeDtypeStruct((splits, b, k), jnp.float32)
  kernel = functools.partial(_matvec_kernel, k=k, b=b, bp=padded_batch(b), block_k=bk,
                             block_d=bd, d=d, per_split=per_split, rowmap=rowmap,
                             epilogue=epilogue)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(cdiv(k, bk), splits),
      compiler_params=_params(tuning), interpret=interpret, name="dejavu_gather_matvec",
  )(count, idx, x, w, w if bias is None else bias)


# ----------------------------------------------------------------------------- fc2-like


def _matvec_t_kernel(count_ref, idx_ref, h_ref, w_ref, b1_ref, mask_ref, m_ref, l_ref, *refs, k, b, bp,
                     block_k, block_d, d, per_split, rowmap, h_mode, has_b1, has_mask, group, h_dtype, splits,
                     scores=None, into=False):
  p, q = pl.program_id(0), pl.program_id(1)
  if into:  # (acc in, acc out): one buffer, aliased; each program adds its tile atomically
    _, out_ref = refs
  elif scores is None:
    out_ref, = refs
  else:  # a `hosted_sets.ScoresJob` on the programs after the splits' rows (program t per column tile)
    from pallas_kernels.predict_sets import hosted_scores_tile

    job_refs, (out_ref, *sets_refs) = refs[:6], refs[6:]

    @pl.when(p >= splits)
    def _():
      hosted_scores_tile((p - splits) * pl.num_programs(1) + q, job_refs, sets_refs, scores)

  @pl.when(p < splits)
  def _():
    _matvec_t_split(p, q, count_ref, idx_ref, h_ref, w_ref, b1_ref, mask_ref, m_ref, l_ref, out_ref, k=k, b=b, bp=bp,
                    block_k=block_k, block_d=block_d, d=d, per_split=per_split, rowmap=rowmap, h_mode=h_mode,
                    has_b1=has_b1, has_mask=has_mask, group=group, h_dtype=h_dtype, into=into)


def _matvec_t_split(p, q, count_ref, idx_ref, h_ref, w_ref, b1_ref, mask_ref, m_ref, l_ref, out_ref, *, k, b, bp,
                    block_k, block_d, d, per_split, rowmap, h_mode, has_b1, has_mask, group, h_dtype, into=False):
  count = _clamped_count(count_ref, k)

  def sub(i):
    return _block(idx_ref, count, (p * per_split + i) * block_k, block_k, rowmap)

  def h_block(pos, rows, ok):
    if h_mode == "h":
      return _load_batch(h_ref, b, bp, pos, ok).astype(jnp.float32)
    if h_mode == "attn":  # flash-decoding partials (o, max, sum) of position pos's group (head)
      g = pos // group
      ms = [_load_batch(m_ref, b, bp, g, ok, lead=(s,)) for s in range(h_ref.shape[0])]
      m_all = functools.reduce(jnp.maximum, ms)
      num = den = jnp.zeros((bp, pos.shape[0]), jnp.float32)
      for s, m in enumerate(ms):
        scale = jnp.exp(m - m_all)
        num = num + _load_batch(h_ref, b, bp, pos, ok, lead=(s,)) * scale
        den = den + _load_batch(l_ref, b, bp, g, ok, lead=(s,)) * scale
      return (num / jnp.where(den > 0, den, 1.0)).astype(h_dtype).astype(jnp.float32)
    # h_mode == "pre": relu(sum over fc1 splits of pre-activations + b1) * mask
    pre = _load_batch(h_ref, b, bp, pos, ok, lead=(0,))
    for s in range(1, h_ref.shape[0]):
      pre = pre + _load_batch(h_ref, b, bp, pos, ok, lead=(s,))
    if has_b1:
      pre = pre + pltr.load(b1_ref.at[rows], mask=ok, other=0).astype(jnp.float32)[None, :]
    h = jnp.where(ok[None, :], jnp.maximum(pre, 0.0), 0.0)
    if has_mask:
      h = h * _load_batch(mask_ref, b, bp, pos, ok).astype(jnp.float32)
    return h

  def load(i, more=None):
    _, rows, ok = sub(i)
    return _load_rows(w_ref, rows, ok, q, block_d, d, more=more)

  def body(i, carry):
    acc, w = carry
    nxt = load(jnp.minimum(i + 1, per_split - 1), more=i + 1 < per_split)
    hb = h_block(*sub(i))
    if bp > 1:
      acc = acc + pltr.dot(hb.astype(w.dtype), w)
    else:
      acc = acc + hb.reshape(block_k, 1) * w.astype(jnp.float32)
    return acc, nxt

  acc0 = (jnp.zeros((bp, block_d), jnp.float32) if bp > 1
          else jnp.zeros((block_k, block_d), jnp.float32))
  acc, _ = lax.fori_loop(0, per_split, body, (acc0, load(0)))
  if bp == 1:
    acc = jnp.sum(acc, axis=0)[None, :]
  cols, col_ok = _cols(q, block_d, d)
  if into:
    _add_batch(out_ref, acc, cols)
  else:
    _store_batch(out_ref, acc, b, cols, col_ok, lead=(p,))


@functools.partial(jax.jit, static_argnames=("k", "tuning", "rowmap", "h_dtype", "scores", "interpret"))
def gather_matvec_t(h, w, idx, count, b1=None, mask=None, attn=None, scores_in=None, acc=None, *, k: int,
                    tuning: GemvTuning, rowmap=("idx",), h_dtype=None, scores=None, interpret: bool = False):
  """Partial h @ w[rows(pos)] for pos < k -> f32 [splits, B, d]; with ``acc`` (f32 [B, d]) ->
  acc + their sum, f32 [B, d]: each program adds its tile into acc's buffer (aliased to the
  output) with f32 atomics, so no partials are written (the sum's order, and so its last
  bits, may vary from run to run); where `atomic_fits` does not hold, acc + the partials' sum.
  h: [B, k] activations, or f32 [s1, B, k] fc1 partials (then h = relu(sum + b1[rows]) *
  mask is rebuilt per tile); w [n, d]; count [1] int32.
  attn = (m, l), f32 [s1, B, k // g] (g = rowmap[1], the positions of a head): h is then
  f32 [s1, B, k] flash-decoding partial outputs, combined per tile as
  sum_s h[s] exp(m[s] - max m) / sum_s l[s] exp(m[s] - max m) (0 where that sum is 0) and
  rounded to ``h_dtype``.

  ``scores`` (static: `hosted_sets.ScoresJob.static`) with scores_in
  (hidden, w2m, b2m, w2h, b2h, thr): a job of scores on programs after the splits' rows, one
  per (row, column tile); returned after the partials as (loc [n_tiles, T], cnt [n_tiles],
  heads [head_k]) int32."""
  h_mode = "attn" if attn is not None else "pre" if h.ndim == 3 else "h"
  if attn is not None:
    assert rowmap[0] == "heads" and h.ndim == 3 and h_dtype is not None, "attention partials go with heads rows"
  b = h.shape[-2]
  d = w.shape[1]
  bk, bd = tuning.block_k, tuning.block_d
  n_blocks = cdiv(k, bk)
  splits = max(1, min(tuning.splits, n_blocks))
  per_split = cdiv(n_blocks, splits)
  splits = cdiv(n_blocks, per_split)
  kernel = functools.partial(
      _matvec_t_kernel, k=k, b=b, bp=padded_batch(b), block_k=bk, block_d=bd, d=d,
      per_split=per_split, rowmap=rowmap, h_mode=h_mode, has_b1=b1 is not None,
      has_mask=mask is not None, group=rowmap[1] if attn is not None else 1, h_dtype=h_dtype, splits=splits,
      scores=scores, into=acc is not None)
  out_shape, n_q, rows = jax.ShapeDtypeStruct((splits, b, d), jnp.float32), cdiv(d, bd), splits
  ins = (count, idx, h, w, w if b1 is None else b1, h if mask is None else mask, *(attn if attn is not None else (w, w)))
  if acc is not None:
    assert scores is None, "a hosted scores job goes with written partials"
    if not atomic_fits(b, d, bd):
      return acc + gather_matvec_t(h, w, idx, count, b1, mask, attn, k=k, tuning=tuning, rowmap=rowmap,
                                   h_dtype=h_dtype, interpret=interpret).sum(0)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((b, d), jnp.float32), grid=(rows, n_q),
        input_output_aliases={len(ins): 0}, compiler_params=_params(tuning), interpret=interpret,
        name="dejavu_gather_matvec_t_acc",
    )(*ins, acc)
  if scores is not None:
    from pallas_kernels.predict_sets import hosted_scores_outputs

    sets_shapes, programs = hosted_scores_outputs(scores)
    out_shape = (out_shape, *sets_shapes)
    rows += cdiv(programs, n_q)
    ins += tuple(scores_in)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(rows, n_q), compiler_params=_params(tuning), interpret=interpret,
      name="dejavu_gather_matvec_t",
  )(*ins)
