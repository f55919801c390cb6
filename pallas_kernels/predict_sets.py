"""A layer's batch-1 lookahead sets in three kernels: both predictors, the heads' top k and
the MLP's threshold set, with reference.

    predict_sets(x, mlp, head, threshold, layer=l, mlp_k=k, head_k=kh)
        == predict_sets_reference(...)                       (sets; scores up to rounding)
        -> heads [kh] int32 (the kh best head scores, best first, ties: lower index),
           idx [k] int32 (the neurons whose score > threshold, ascending, the first k if
           more pass, zeros after), count int32 scalar (how many of idx are real)

    mlp = (w1 [L, d, rm], w2 [L, rm, F], b2 [L, F]), head = (w1 [L, d, rh], w2 [L, rh, H],
    b2 [L, H]): the stacked `dejavu_jax.predictors` weights, read in place at layer l (a
    static int); x [1, d] any float; a predictor's scores are
    standardize(x) @ w1[l] @ w2[l] + b2[l], inputs of each GEMV rounded to its weight's
    dtype, f32 accumulation (`low_rank_scores`, the predictors' definition, kept here).

Why: as XLA ops a layer's sets took 19 kernels and 41 us at the OPT-13B shape on an H100
(layer_kernels.json, "layer_sets_threshold"), for 15.7 MB of predictor weights (5.7 us at
peak): two standardizations, four GEMVs whose first halves XLA runs as column reductions,
the heads' ranking, and a 5-kernel prefix sum for the compaction. Here:

1. ``hidden``: grid (row splits S, column tiles of both w1). Each program standardizes x
   (every program reads all of x: d floats from L2), rounds its rows of x to w1's dtype,
   and writes f32 partials [S, rm] / [S, rh] of x @ w1 for its tile of rows x columns.
2. ``scores``: one program per tile of T neurons, plus one for the heads. A neuron program
   sums the S partials in a fixed order (h, rounded to w2's dtype), reads w2[:, tile] and
   b2[tile], compares with the threshold, and compacts its tile's members (a prefix sum
   over T lanes) into its own row of a [F/T, T] buffer, with their count. The head program
   scores all H heads and ranks them by counting (who beats whom) into the kh best.
3. ``scatter``: one program per tile: its offset is the sum of the counts before it, and
   it copies its members to idx[offset..]; slots from the total to k get zeros.

A decode step can run steps 1 and 3 on extra programs of its q + K/V launches instead
(`hidden_gemv` over `stack_w1t`'s transposed w1, then ``hidden=``; ``scatter=False`` and
`TileSets`): see `pallas_kernels.sparse_attention.head_sparse_q_kv_update`.

Every step is deterministic (no atomics), so the sets equal the reference's up to scores
that sit within rounding of the threshold (or of each other, for the heads): the partials
are summed in another order than XLA's. Backends (`impl`): "triton" (Pallas lowered through
Triton; on the CPU in interpret mode), "xla" (the reference), "auto" (what
`pallas_kernels.dispatch` names for "predict_sets"). Not written for Mosaic GPU: its Pallas
lowering has no prefix sum or scatter store, which steps 2 and 3 need.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import _common as c

F32, I32 = jnp.float32, jnp.int32
EPS = 1e-5  # `standardize`'s


@dataclasses.dataclass(frozen=True)
class SetsTuning:
  """rows: x rows per ``hidden`` program (power of 2; S = d / rows partials); cols: w1
  columns per ``hidden`` program; tile: neurons per ``scores`` / ``scatter`` program (power
  of 2); warps of the three kernels. prep="xla": x is standardized by an XLA fusion before
  ``hidden`` (its programs then read only their own rows of x) and the partials are summed
  by an XLA reduction before ``scores`` (its programs then read h, not S partials): two
  small kernels more, L2 traffic of (programs x d) and (programs x S x r) less."""
  rows: int = 512
  cols: int = 16
  tile: int = 64
  warps: tuple[int, int, int] = (4, 8, 4)
  prep: str = "kernel"


# Neurons a ``scores`` program scores (a power of 2, 16 to 256): its rank rows of w2 are read in
# runs of 2 x tile bytes (bf16). See `auto_tuning`.
SCORES_TILE = 64
SCORES_WARPS = 8  # warps of a ``scores`` program


def auto_tuning(d: int, rm: int, f: int) -> SetsTuning:
  """256-row x 32-column w1 tiles (16 KB bf16; S = d / 256 partials) with 8 warps;
  `SCORES_TILE` (64) neurons a ``scores`` program with `SCORES_WARPS` (8). Measured on an H100
  (layer_kernels.json, us a layer, against 512 x 16 tiles with 4 warps): OPT-13B 16.0 vs 17.8,
  OPT-30B 36.0 vs 44.4; standardizing and summing the partials in XLA (prep="xla") was slower
  at 13B (18.5) and about the same at 30B (35.4). The scores tile, in the decode step (H100,
  threshold 10% / half the heads, ms a token, same job; scores_tile.json, scores_tile_b.json):
  13B (rank 256) 64 neurons 4.42, 128 4.51, 256 4.49; 30B (rank 512) 32 neurons 9.78 / 9.73,
  64 9.44, 128 9.51 / 9.45, 256 11.26 (112 programs, fewer than the SMs)."""
  rows = min(256, c.next_pow2(d))
  if SCORES_TILE not in (16, 32, 64, 128, 256):
    raise ValueError(f"predict_sets.SCORES_TILE is {SCORES_TILE!r}; use a power of 2 from 16 to 256.")
  if SCORES_WARPS not in (1, 2, 4, 8, 16, 32):
    raise ValueError(f"predict_sets.SCORES_WARPS is {SCORES_WARPS!r}; use a power of 2 from 1 to 32 (Triton's warps).")
  del rm  # the tile no longer depends on the rank (measured: 64 at rank 256 and 512)
  tile = max(16, min(SCORES_TILE, c.next_pow2(f)))
  return SetsTuning(rows=rows, cols=32, tile=tile, warps=(8, SCORES_WARPS, 4))


# ----------------------------------------------------------------------------- reference


# The predictors' math, defined here once: `dejavu_jax.predictors.modules` imports these two
# (pallas_kernels does not import dejavu_jax), so the reference is the model's own definition.
def standardize(x: jax.Array, eps: float = EPS) -> jax.Array:
  """Parameter-free LayerNorm over the last axis. x: [..., d] any float -> [..., d] f32."""
  x = x.astype(F32)
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)


def low_rank_scores(w1: jax.Array, w2: jax.Array, b2: jax.Array, x: jax.Array) -> jax.Array:
  """Scores of one layer's predictor. x: [..., d]; w1: [d, r]; w2: [r, n]; b2: [n].
  Matmuls read the weights in their own dtype (bf16 or f32) and accumulate in f32.
  Returns [..., n] f32."""
  h = jnp.einsum("...d,dr->...r", standardize(x).astype(w1.dtype), w1, preferred_element_type=F32)
  s = jnp.einsum("...r,rn->...n", h.astype(w2.dtype), w2, preferred_element_type=F32)
  return s + b2.astype(F32)


def scores_reference(x, w1, w2, b2, layer: int) -> jax.Array:
  """One predictor's f32 scores [B, n] of x [B, d] at ``layer`` of its stacked weights."""
  return low_rank_scores(w1[layer], w2[layer], b2[layer], x)


def predict_sets_reference(x, mlp, head, threshold, *, layer: int, mlp_k: int, head_k: int,
                           impl: str = "xla", tuning=None):
  """(heads [head_k], idx [mlp_k], count): XLA's top_k of the head scores and nonzero of the
  MLP scores above ``threshold`` (see the module docstring)."""
  del impl, tuning
  heads = jax.lax.top_k(scores_reference(x, *head, layer)[0], head_k)[1].astype(I32)
  above = scores_reference(x, *mlp, layer)[0] > jnp.asarray(threshold, F32)
  idx = jnp.nonzero(above, size=mlp_k, fill_value=0)[0].astype(I32)
  return heads, idx, jnp.minimum(jnp.sum(above, dtype=I32), mlp_k)


def sets_disagreement(got, x, mlp, head, threshold, *, layer: int, mlp_k: int, head_k: int,
                      tol: float) -> list[str]:
  """What in ``got`` (predict_sets' output) the reference would not give, allowing scores
  within ``tol`` x (1 + the largest |score|) of the threshold (MLP) or of each other (heads)
  to fall either way; [] when they agree. For tests and the GPU check."""
  import numpy as np

  heads, idx, count = (np.asarray(a) for a in got)
  sm = np.asarray(scores_reference(x, *mlp, layer)[0])
  sh = np.asarray(scores_reference(x, *head, layer)[0])
  tol = tol * (1.0 + max(np.abs(sm).max(), np.abs(sh).max()))
  bad = []
  if heads.shape != (head_k,) or len(set(heads.tolist())) != head_k or heads.min() < 0 or heads.max() >= sh.size:
    return [f"heads {heads.tolist()} are not {head_k} distinct heads"]
  worst = np.abs(sh[heads] - -np.sort(-sh)[:head_k]).max()
  if worst > tol:
    bad.append(f"head scores in order differ from the best {head_k} by {worst:.3g} > {tol:.3g}")
  count = int(count)
  if idx.shape != (mlp_k,) or not 0 <= count <= mlp_k:
    return bad + [f"idx shape {idx.shape} / count {count} for k = {mlp_k}"]
  members, rest = idx[:count], idx[count:]
  if (np.diff(members) <= 0).any() or (rest != 0).any() or (count and (members.min() < 0 or members.max() >= sm.size)):
    return bad + ["idx is not ascending members followed by zeros"]
  if count and (sm[members] <= threshold - tol).any():
    bad.append("a member's score is below the threshold")
  clearly = np.flatnonzero(sm > threshold + tol)
  if count == mlp_k:  # capped: the lowest-indexed k of those above
    clearly = clearly[clearly < members[-1]] if count else clearly[:0]
  elif count > int((sm > threshold - tol).sum()):
    bad.append(f"count {count} exceeds the scores above the threshold")
  missing = set(clearly.tolist()) - set(members.tolist())
  if missing:
    bad.append(f"{len(missing)} neurons clearly above the threshold are missing")
  return bad


# ----------------------------------------------------------------------------- kernels


def row_stats(x_ref, d: int, eps: float):
  """In a kernel: (mean, 1 / sqrt(variance + eps)) of row 0 of x_ref [1, d], in f32 (the
  statistics of `standardize`). Also used by the q + K/V launch's side GEMV."""
  i = jnp.arange(c.next_pow2(d))
  ok = i < d
  xa = pltr.load(x_ref.at[0, jnp.where(ok, i, 0)], mask=ok, other=0.0).astype(F32)
  mean = jnp.sum(xa) / d
  xc = jnp.where(ok, xa - mean, 0.0)
  return mean, jax.lax.rsqrt(jnp.sum(xc * xc) / d + eps)


def _hidden_kernel(x_ref, wm_ref, wh_ref, pm_ref, ph_ref, *, layer, d, rm, rh, rows, cols, n_m, standardized):
  s, j = pl.program_id(0), pl.program_id(1)
  r = s * rows + jnp.arange(rows)
  rok = r < d
  r = jnp.where(rok, r, 0)

  def partial(w_ref, p_ref, width, col0):
    col = col0 + jnp.arange(cols)
    cok = col < width
    m = rok[:, None] & cok[None, :]
    # the weight tile first: its DRAM latency overlaps the standardization below
    w = pltr.load(w_ref.at[(layer * d + r)[:, None], jnp.where(cok, col, 0)[None, :]], mask=m, other=0.0)
    xr = pltr.load(x_ref.at[0, r], mask=rok, other=0.0).astype(F32)
    if not standardized:
      mean, rstd = row_stats(x_ref, d, EPS)
      xr = (xr - mean) * rstd
    xq = xr.astype(w.dtype).astype(F32)
    acc = jnp.sum(xq[:, None] * w.astype(F32), axis=0)
    pltr.store(p_ref.at[s, jnp.where(cok, col, width)], acc, mask=cok)  # masked lanes: out of range

  @pl.when(j < n_m)
  def _():
    partial(wm_ref, pm_ref, rm, j * cols)

  @pl.when(j >= n_m)
  def _():
    partial(wh_ref, ph_ref, rh, (j - n_m) * cols)


def _hidden(p_ref, n_split, width, dtype, off=0):
  """Sum of the [n_split, width] partials (columns off..) in row order, rounded to dtype -> f32
  [pow2 >= width]."""
  si, ri = jnp.arange(c.next_pow2(n_split)), jnp.arange(c.next_pow2(width))
  m = (si < n_split)[:, None] & (ri < width)[None, :]
  p = pltr.load(p_ref.at[jnp.where(si < n_split, si, 0)[:, None], off + jnp.where(ri < width, ri, 0)[None, :]],
                mask=m, other=0.0)
  return jnp.sum(p, axis=0).astype(dtype).astype(F32)


def _row_scores(h_of, w_ref, b_ref, *, layer, width, col, cok):
  """h_of() [pow2 >= width] @ w[layer rows, col] + b[layer, col] -> f32 [len(col)]; the weight
  tile is loaded before h is summed, so its DRAM latency overlaps that."""
  ri = jnp.arange(c.next_pow2(width))
  rok = ri < width
  m = rok[:, None] & cok[None, :]
  w = pltr.load(w_ref.at[(layer * width + jnp.where(rok, ri, 0))[:, None], jnp.where(cok, col, 0)[None, :]],
                mask=m, other=0.0)
  b = pltr.load(b_ref.at[layer, jnp.where(cok, col, 0)], mask=cok, other=0.0)
  return jnp.sum(h_of()[:, None] * w.astype(F32), axis=0) + b.astype(F32)


def scores_tile(t, pm_ref, ph_ref, w2m_ref, b2m_ref, w2h_ref, b2h_ref, thr_ref, loc_ref, cnt_ref, heads_ref, *,
                layer, n_split, rm, rh, f, n_heads, tile, n_tiles, head_k, dtm, dth, head_off):
  """Program t of the scores: t < n_tiles scores neuron tile t and compacts its members into
  loc[t] (count in cnt[t]); t == n_tiles scores and ranks the heads. Also run on extra programs
  of the out-projection's launch (`pallas_kernels.hosted_sets.ScoresJob`)."""

  @pl.when(t < n_tiles)
  def _():
    lane = jnp.arange(tile)
    col = t * tile + lane
    cok = col < f
    s = _row_scores(lambda: _hidden(pm_ref, n_split, rm, dtm), w2m_ref, b2m_ref, layer=layer, width=rm, col=col,
                    cok=cok)
    take = cok & (s > thr_ref[0])
    taken = jnp.cumsum(take.astype(I32))
    total = jnp.sum(take.astype(I32))
    # a permutation of the tile's lanes: members first (value: the neuron), then the rest
    pos = jnp.where(take, taken - 1, total + lane - taken)
    pltr.store(loc_ref.at[t, pos], jnp.where(take, col, 0))
    pltr.store(cnt_ref.at[t + jnp.zeros((1,), I32)], total + jnp.zeros((1,), I32))

  @pl.when(t == n_tiles)
  def _():
    col = jnp.arange(c.next_pow2(n_heads))
    cok = col < n_heads
    s = _row_scores(lambda: _hidden(ph_ref, n_split, rh, dth, head_off), w2h_ref, b2h_ref, layer=layer, width=rh,
                    col=col, cok=cok)
    s = jnp.where(cok, s, -jnp.inf)
    beats = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (col[None, :] < col[:, None]))
    rank = jnp.sum((beats & cok[None, :]).astype(I32), axis=1)  # 0 = the best
    ok = cok & (rank < head_k)
    pltr.store(heads_ref.at[jnp.where(ok, rank, head_k)], col, mask=ok)


def _scores_kernel(*refs, **kw):
  scores_tile(pl.program_id(0), *refs, **kw)


def hosted_scores_tile(t, job_refs, sets_refs, static):
  """`scores_tile` t on an extra program of another launch: job_refs the job's 6 inputs
  (hidden, w2m, b2m, w2h, b2h, thr; the one hidden row holds both predictors'), sets_refs its
  (loc, cnt, heads) outputs, static its kernel parameters (`hosted_sets.ScoresJob.static`)."""
  scores_tile(t, job_refs[0], job_refs[0], *job_refs[1:], *sets_refs, **dict(static))


def hosted_scores_outputs(static) -> tuple[tuple, int]:
  """A hosted scores job's (loc [n_tiles, T], cnt [n_tiles], heads [head_k]) int32 output
  shapes, and the programs it needs (n_tiles neuron tiles + the heads' one)."""
  p = dict(static)
  shapes = (jax.ShapeDtypeStruct((p["n_tiles"], p["tile"]), I32), jax.ShapeDtypeStruct((p["n_tiles"],), I32),
            jax.ShapeDtypeStruct((p["head_k"],), I32))
  return shapes, p["n_tiles"] + 1


def scatter_tile(t, loc_ref, cnt_ref, idx_ref, count_ref, *, tile, n_tiles, k):
  """Program t of the scatter: tile t's members to idx[offset..] (offset: the members of the
  tiles before it), zeros from the total to k; program 0 writes the count. Also run on extra
  programs of the q + K/V launch (`head_sparse_q_kv_update(scatter=...)`)."""
  u = jnp.arange(c.next_pow2(n_tiles))
  counts = pltr.load(cnt_ref.at[jnp.where(u < n_tiles, u, 0)], mask=u < n_tiles, other=0)
  offset = jnp.sum(jnp.where(u < t, counts, 0))
  mine = jnp.sum(jnp.where(u == t, counts, 0))
  total = jnp.sum(counts)
  lane = jnp.arange(tile)
  dest = offset + lane
  ok = (lane < mine) & (dest < k)
  pltr.store(idx_ref.at[jnp.where(ok, dest, k)], pltr.load(loc_ref.at[t, lane]), mask=ok)
  z = t * tile + lane  # the tiles' slots cover [0, n_tiles tile) >= [0, k): zeros from the total on
  zok = (z >= total) & (z < k)
  pltr.store(idx_ref.at[jnp.where(zok, z, k)], jnp.zeros((tile,), I32), mask=zok)

  @pl.when(t == 0)
  def _():
    pltr.store(count_ref.at[jnp.zeros((1,), I32)], jnp.minimum(total, k) + jnp.zeros((1,), I32))


def _scatter_kernel(loc_ref, cnt_ref, idx_ref, count_ref, *, tile, n_tiles, k):
  scatter_tile(pl.program_id(0), loc_ref, cnt_ref, idx_ref, count_ref, tile=tile, n_tiles=n_tiles, k=k)


class TileSets(NamedTuple):
  """An MLP set before its scatter (`predict_sets(scatter=False)`): row t of loc [n_tiles, T]
  (T a power of 2, n_tiles T >= k) holds tile t's members first, ascending; cnt [n_tiles]
  int32 counts them; k (a Python int: keep it out of jit arguments) is the cap.
  `scatter_sets` gives (idx [k], count)."""
  loc: jax.Array
  cnt: jax.Array
  k: int


@functools.partial(jax.jit, static_argnames=("layer", "mlp_k", "head_k", "tuning", "scatter", "interpret"))
def _predict_sets_triton(x, mlp, head, threshold, hidden, *, layer, mlp_k, head_k, tuning: SetsTuning, interpret,
                         scatter: bool = True):
  (w1m, w2m, b2m), (w1h, w2h, b2h) = mlp, head
  L, d, rm = w1m.shape
  rh, f, n_heads = w1h.shape[2], w2m.shape[2], w2h.shape[2]
  t = tuning
  n_split, n_m, n_h = c.cdiv(d, t.rows), c.cdiv(rm, t.cols), c.cdiv(rh, t.cols)
  prep = t.prep == "xla"
  if hidden is not None:  # both first GEMVs given (x @ w1, [1, rm + rh]): no hidden kernel
    pm = ph = hidden
    n_split, head_off = 1, rm
  else:
    pm, ph = _hidden_partials(x, w1m, w1h, n_split=n_split, n_m=n_m, n_h=n_h, prep=prep, t=t, interpret=interpret,
                              layer=layer)
    head_off = 0
    if prep:
      pm, ph, n_split = pm.sum(0, keepdims=True), ph.sum(0, keepdims=True), 1
  n_tiles = c.cdiv(f, t.tile)
  loc, cnt, heads = pl.pallas_call(
      functools.partial(_scores_kernel, layer=layer, n_split=n_split, rm=rm, rh=rh, f=f, n_heads=n_heads,
                        tile=t.tile, n_tiles=n_tiles, head_k=head_k, dtm=w2m.dtype, dth=w2h.dtype,
                        head_off=head_off),
      out_shape=(jax.ShapeDtypeStruct((n_tiles, t.tile), I32), jax.ShapeDtypeStruct((n_tiles,), I32),
                 jax.ShapeDtypeStruct((head_k,), I32)),
      grid=(n_tiles + 1,), compiler_params=pltr.CompilerParams(num_warps=t.warps[1], num_stages=1),
      interpret=interpret, name="dejavu_sets_scores",
  )(pm, ph, w2m.reshape(L * rm, f), b2m, w2h.reshape(L * rh, n_heads), b2h,
    jnp.asarray(threshold, F32).reshape(1))
  if not scatter:
    return heads, loc, cnt
  return (heads, *scatter_call(loc, cnt, mlp_k, warps=t.warps[2], interpret=interpret))


def scatter_call(loc, cnt, k: int, *, warps: int, interpret: bool):
  """The scatter kernel over a `TileSets`' loc [n_tiles, T] and cnt [n_tiles] -> (idx [k], count)."""
  n_tiles, tile = loc.shape
  idx, count = pl.pallas_call(
      functools.partial(_scatter_kernel, tile=tile, n_tiles=n_tiles, k=k),
      out_shape=(jax.ShapeDtypeStruct((k,), I32), jax.ShapeDtypeStruct((1,), I32)),
      grid=(n_tiles,), compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret, name="dejavu_sets_scatter",
  )(loc, cnt)
  return idx, count[0]


def _hidden_partials(x, w1m, w1h, *, n_split, n_m, n_h, prep, t, interpret, layer):
  L, d, rm = w1m.shape
  rh = w1h.shape[2]
  return pl.pallas_call(
      functools.partial(_hidden_kernel, layer=layer, d=d, rm=rm, rh=rh, rows=t.rows, cols=t.cols, n_m=n_m,
                        standardized=prep),
      out_shape=(jax.ShapeDtypeStruct((n_split, rm), F32), jax.ShapeDtypeStruct((n_split, rh), F32)),
      grid=(n_split, n_m + n_h), compiler_params=pltr.CompilerParams(num_warps=t.warps[0], num_stages=1),
      interpret=interpret, name="dejavu_sets_hidden",
  )(standardize(x) if prep else x, w1m.reshape(L * d, rm), w1h.reshape(L * d, rh))


def _check(x, mlp, head, layer, mlp_k, head_k):
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES)
  if x.shape[0] != 1:
    raise ValueError(f"x has batch {x.shape[0]}; predict_sets is the batch-1 path (use "
                     "dejavu_jax.sparse.select for batches).")
  d = x.shape[1]
  for name, (w1, w2, b2) in (("mlp", mlp), ("head", head)):
    c.check_array(f"{name} w1", w1, ndim=3, dtypes=c.FLOAT_DTYPES, hint="w1 is [L, d, r].")
    L, dd, r = w1.shape
    c.check_array(f"{name} w2", w2, shape=(L, r, None), dtypes=c.FLOAT_DTYPES, hint="w2 is [L, r, n].")
    c.check_array(f"{name} b2", b2, shape=(L, w2.shape[2]), dtypes=c.FLOAT_DTYPES, hint="b2 is [L, n].")
    if dd != d:
      raise ValueError(f"{name} predictor reads d = {dd} but x has d = {d}: predictors for another model?")
  if mlp[0].shape[0] != head[0].shape[0]:
    raise ValueError(f"the MLP and head predictors stack {mlp[0].shape[0]} and {head[0].shape[0]} layers.")
  if not isinstance(layer, int) or not 0 <= layer < mlp[0].shape[0]:
    raise ValueError(f"layer must be a static int in [0, {mlp[0].shape[0]}), got {layer!r}.")
  for name, k, n in (("mlp_k", mlp_k, mlp[1].shape[2]), ("head_k", head_k, head[1].shape[2])):
    if not isinstance(k, int) or not 1 <= k <= n:
      raise ValueError(f"{name} must be an int in [1, {n}], got {k!r}.")


def check_hidden(hidden, rm: int, rh: int) -> None:
  """``hidden`` must be both predictors' first GEMV: f32 [1, rm + rh]."""
  c.check_array("hidden", hidden, shape=(1, rm + rh), dtypes=(F32,),
                hint="hidden is both predictors' first GEMV, f32 [1, rm + rh] (hidden_gemv's).")


def predict_sets(x, mlp, head, threshold, *, layer: int, mlp_k: int, head_k: int, impl: str = "auto",
                 tuning: SetsTuning | None = None, hidden=None, scatter: bool = True):
  """A layer's batch-1 sets: (heads [head_k], idx [mlp_k], count); see the module docstring.
  threshold: a float or f32 scalar array (compared with the f32 MLP scores). ``hidden``:
  both predictors' first GEMV of x, f32 [1, rm + rh] (MLP columns first), computed elsewhere
  (`hidden_gemv`, e.g. inside the q + K/V kernel): the ``hidden`` kernel is skipped (the
  "xla" path computes the sets from x, the definition). ``scatter=False``: (heads, `TileSets`),
  the MLP set before its scatter (for `head_sparse_q_kv_update(scatter=...)` to finish on
  extra programs of its launch), one kernel less."""
  _check(x, mlp, head, layer, mlp_k, head_k)
  rm, rh = mlp[0].shape[2], head[0].shape[2]
  if hidden is not None:
    check_hidden(hidden, rm, rh)
  impl = c.resolve_impl(impl, "predict_sets", 1, ("auto", "triton", "xla"))
  if impl == "xla":
    heads, idx, count = predict_sets_reference(x, mlp, head, threshold, layer=layer, mlp_k=mlp_k, head_k=head_k)
    if scatter:
      return heads, idx, count
    width = c.next_pow2(mlp_k)  # one tile holding the whole set
    return heads, TileSets(jnp.pad(idx, (0, width - mlp_k))[None], count.reshape(1), mlp_k)
  t = tuning or auto_tuning(x.shape[1], rm, mlp[1].shape[2])
  got = _predict_sets_triton(x, tuple(mlp), tuple(head), threshold, hidden, layer=layer, mlp_k=mlp_k,
                             head_k=head_k, tuning=t, interpret=c.on_cpu(), scatter=scatter)
  return got if scatter else (got[0], TileSets(*got[1:], mlp_k))
