"""Triton-lowered Pallas kernel of a decode step's q + K/V projections, written into the KV
caches in place, with work of the sets on extra programs of the same launch:

* `gather_matvec_q_kv_cache`: q of the selected heads and K/V of every head (or of the
  selected ones, marking their cache slots valid), plus optionally a side GEMV (the next
  layer's predictor hidden, `pallas_kernels.hosted_sets.SideGemv`) and the scatter of this
  layer's MLP set (`pallas_kernels.predict_sets.TileSets`).

Built on the gathered-row GEMV helpers of `_triton_gemv` (tiles of block_k rows x block_d
columns, the next tile loaded before the current one is used).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels._common import cdiv
from pallas_kernels._triton_gemv import GemvTuning, _params, _project, padded_batch

# Where the hosted programs (side GEMV, scatter) sit in the grid: first, in the first wave beside
# the q / K / V tiles, or last, after them (the runs of 0205614, where the launch grew 5 us for
# 2 us of bytes). First measured 1.1% faster a token at 13B with K/V of every head (4.36 vs
# 4.41 ms) and the same with K/V selected (3.80 vs 3.79; H100, run of 6b68ea0,
# benchmarks/plans/h100_hosted_order.json).
EXTRA_PROGRAMS_FIRST = True


def _q_kv_cache_kernel(*refs, b, bp, block_k, block_d, d, n_heads, hd, k_h, q_scale, has_bias, kv_selected,
                       mark_valid, side, scatter, extra_first=False):
  # inputs: heads, slot, x, w, bias, k/v caches[, head_valid][, side x, side w][, loc, cnt];
  # outputs: q, the caches[, head_valid][, side h][, idx, count]. Caches and head_valid are
  # aliased: entries not written keep their values.
  n_in = 7 + mark_valid + 2 * (side is not None) + 2 * (scatter is not None)
  ins, outs = iter(refs[:n_in]), iter(refs[n_in:])
  heads_ref, slot_ref, x_ref, w_ref, bias_ref, _, _ = (next(ins) for _ in range(7))
  q_ref, kc_ref, vc_ref = (next(outs) for _ in range(3))
  if mark_valid:
    next(ins)
  hv_ref = next(outs) if mark_valid else None
  xs_ref, ws_ref, hs_ref = (next(ins), next(ins), next(outs)) if side is not None else (None,) * 3
  loc_ref, cnt_ref, idx_ref, count_ref = ((next(ins), next(ins), next(outs), next(outs)) if scatter is not None
                                          else (None,) * 4)
  p = pl.program_id(0)
  nq = k_h * hd  # positions [0, nq): q of the selected heads; then K, then V of the K/V heads
  n_kv = k_h if kv_selected else n_heads  # K/V heads: the selected ones, or every head
  n_main = cdiv(nq + 2 * n_kv * hd, block_k)
  n_side = cdiv(side[1], block_k) if side is not None else 0
  n_scatter = scatter[0] if scatter is not None else 0
  # program ids: [q/K/V tiles][side][scatter], or [side][scatter][q/K/V tiles] when extra_first
  e = p if extra_first else p - n_main  # index among the hosted programs (< 0 or >= n_extra: none)
  m = p - (n_side + n_scatter) if extra_first else p  # index among the q / K / V tiles

  @pl.when((m >= 0) & (m < n_main))
  def _():
    _q_kv_tile(m, heads_ref, slot_ref, x_ref, w_ref, bias_ref, q_ref, kc_ref, vc_ref, hv_ref, b=b, bp=bp,
               block_k=block_k, block_d=block_d, d=d, n_heads=n_heads, hd=hd, nq=nq, n_kv=n_kv, q_scale=q_scale,
               has_bias=has_bias, kv_selected=kv_selected)

  if side is not None:
    @pl.when((e >= 0) & (e < n_side))
    def _():
      _side_tile(e, xs_ref, ws_ref, hs_ref, block_k=block_k, block_d=block_d, d=d, side=side)

  if scatter is not None:
    from pallas_kernels.predict_sets import scatter_tile

    n_tiles, tile, k = scatter

    @pl.when((e >= n_side) & (e < n_side + n_scatter))
    def _():
      scatter_tile(e - n_side, loc_ref, cnt_ref, idx_ref, count_ref, tile=tile, n_tiles=n_tiles, k=k)


def _q_kv_tile(p, heads_ref, slot_ref, x_ref, w_ref, bias_ref, q_ref, kc_ref, vc_ref, hv_ref, *, b, bp, block_k,
               block_d, d, n_heads, hd, nq, n_kv, q_scale, has_bias, kv_selected):
  """Tile p of the q / K / V rows: a tile is all q, all K or all V (hd % block_k == 0)."""
  pos = p * block_k + jnp.arange(block_k)
  is_q = p * block_k < nq
  r = jnp.maximum(pos - nq, 0)
  head_q = pltr.load(heads_ref.at[jnp.minimum(pos, nq - 1) // hd])
  j, e = (r // hd) % n_kv, r % hd
  head = pltr.load(heads_ref.at[j]) if kv_selected else j  # the K/V head of each position
  kv = jnp.maximum(p * block_k - nq, 0) // (n_kv * hd)  # 0: a K tile, 1: a V tile
  rows = jnp.where(is_q, head_q * hd + pos % hd, ((1 + kv) * n_heads + head) * hd + e)
  ok = jnp.full((block_k,), True)
  acc = _project(x_ref, w_ref, rows, ok, 0, cdiv(d, block_d), block_d=block_d, d=d, b=b, bp=bp)
  if has_bias:
    acc = acc + pltr.load(bias_ref.at[rows]).astype(jnp.float32)[None, :]
  bi = jnp.arange(bp)
  bi = jnp.where(bi < b, bi, b)  # padded batch rows go out of range: never stored

  @pl.when(is_q)
  def _():
    pltr.store(q_ref.at[bi[:, None], pos[None, :]], (acc * q_scale).astype(q_ref.dtype),
               mask=jnp.broadcast_to((bi < b)[:, None], acc.shape))

  slot = slot_ref[0]
  for t, ref in ((0, kc_ref), (1, vc_ref)):
    @pl.when(jnp.logical_not(is_q) & (kv == t))
    def _():
      pltr.store(ref.at[bi[:, None], head[None, :], slot, e[None, :]], acc.astype(ref.dtype),
                 mask=jnp.broadcast_to((bi < b)[:, None], acc.shape))

  if hv_ref is not None:  # a K tile marks its head's slot valid (every position of the tile: one head)
    @pl.when(jnp.logical_not(is_q) & (kv == 0))
    def _():
      pltr.store(hv_ref.at[bi[:, None], head[None, :], slot], jnp.ones(acc.shape, hv_ref.dtype),
                 mask=jnp.broadcast_to((bi < b)[:, None], acc.shape))


def _side_tile(p, xs_ref, ws_ref, hs_ref, *, block_k, block_d, d, side):
  """Tile p of the side rows: standardize(xs) (rounded to ws's dtype) @ ws[offset + pos].T."""
  offset, n, eps = side
  pos = p * block_k + jnp.arange(block_k)
  ok = pos < n
  from pallas_kernels.predict_sets import row_stats

  mean, rstd = row_stats(xs_ref, d, eps)
  wdt = ws_ref.dtype
  acc = _project(xs_ref, ws_ref, jnp.where(ok, offset + pos, 0), ok, 0, cdiv(d, block_d), block_d=block_d, d=d,
                 b=1, bp=1, x_map=lambda t: ((t - mean) * rstd).astype(wdt).astype(jnp.float32))
  pltr.store(hs_ref.at[0, jnp.where(ok, pos, n)], acc[0], mask=ok)


@functools.partial(jax.jit, static_argnames=("q_scale", "tuning", "kv_selected", "side", "scatter_k", "extra_first",
                                             "interpret"))
def gather_matvec_q_kv_cache(x, w, bias, heads, k_cache, v_cache, slot, head_valid=None, side_x=None, side_w=None,
                             loc=None, cnt=None, *, q_scale: float, tuning: GemvTuning, kv_selected: bool = False,
                             side: tuple[int, int, float] | None = None, scatter_k: int | None = None,
                             extra_first: bool = False, interpret: bool = False):
  """One kernel: q of the selected heads and K/V of every head (``kv_selected``: of the
  selected heads only) of x [B, d], K/V written into the caches at ``slot``. w: [3 H hd, d]
  (q, k, v rows by head), bias [3 H hd] or None, heads [k_h] int32, k_cache / v_cache
  [B, H, S, hd] (updated in place: aliased to the outputs), slot [1] int32. Returns
  (q [B, k_h hd] in x.dtype, times q_scale before the rounding, k_cache, v_cache). With
  ``kv_selected``, head_valid [B, H, S] (bool or integer; aliased too) may be given: the
  selected heads' entries at ``slot`` are set to 1 and it is returned next. One split (whole
  rows per program); tuning.block_k must divide hd.

  ``side`` = (offset, n, eps), static, with side_x [1, d] and side_w [N, d]: a second GEMV
  in the same launch, on programs beside the q/K/V tiles: standardize(side_x) (eps inside
  the square root; rounded to side_w's dtype) @ side_w[offset : offset + n].T, returned
  next as f32 [1, n] (the predictors' first GEMV, with their weights stored transposed).

  ``scatter_k`` (static) with loc [n_tiles, T] and cnt [n_tiles] int32: an MLP set before its
  scatter (`pallas_kernels.predict_sets.TileSets`) scattered on n_tiles more programs,
  returned last as (idx [scatter_k] int32, count [1] int32). ``extra_first``: those programs
  take the first program ids (the first wave) instead of the last."""
  mark_valid = head_valid is not None
  assert kv_selected or not mark_valid, "head_valid goes with kv_selected"
  b, d = x.shape
  _, n_heads, _, hd = k_cache.shape
  k_h = heads.shape[0]
  bk, bd = tuning.block_k, tuning.block_d
  assert hd % bk == 0, "a tile must not straddle heads"
  n_rows = k_h * hd + 2 * (k_h if kv_selected else n_heads) * hd
  kernel = functools.partial(
      _q_kv_cache_kernel, b=b, bp=padded_batch(b), block_k=bk, block_d=bd, d=d, n_heads=n_heads,
      hd=hd, k_h=k_h, q_scale=float(q_scale), has_bias=bias is not None, kv_selected=kv_selected,
      mark_valid=mark_valid, side=side, scatter=None if scatter_k is None else (*loc.shape, scatter_k),
      extra_first=extra_first)
  out_shape = (jax.ShapeDtypeStruct((b, k_h * hd), x.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
               jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  ins = (heads, slot, x, w, w if bias is None else bias, k_cache, v_cache)
  if mark_valid:
    out_shape += (jax.ShapeDtypeStruct(head_valid.shape, head_valid.dtype),)
    ins += (head_valid,)
  grid = cdiv(n_rows, bk)
  if side is not None:
    assert side_x.shape == (1, d) and side_w.shape[1] == d, "side_x is [1, d], side_w [N, d]"
    out_shape += (jax.ShapeDtypeStruct((1, side[1]), jnp.float32),)
    ins += (side_x, side_w)
    grid += cdiv(side[1], bk)
  if scatter_k is not None:
    assert loc.ndim == 2 and cnt.shape == loc.shape[:1] and loc.shape[0] * loc.shape[1] >= scatter_k
    out_shape += (jax.ShapeDtypeStruct((scatter_k,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    ins += (loc, cnt)
    grid += loc.shape[0]
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,),
      input_output_aliases={5: 1, 6: 2, 7: 3} if mark_valid else {5: 1, 6: 2},
      compiler_params=_params(tuning), interpret=interpret, name="dejavu_q_kv_cache",
  )(*ins)
