"""A layer's batch-1 sets as work hosted by other launches of a fused decode step, with
references. `pallas_kernels.predict_sets` runs the sets in kernels of their own (hidden,
scores, scatter); a decode step can instead run each part on extra programs of a weight
kernel it launches anyway, so the sets cost no launch of their own:

  * the predictors' first GEMV of layer l+1 (`hidden_gemv`, a `SideGemv` over `stack_w1t`'s
    transposed w1) in layer l's q + K/V launch (`head_sparse_q_kv_update(side=...)`);
  * the scores of layer l+1, the MLP set's per-tile compaction and the heads' ranking
    (`scores_job`, a `ScoresJob` on that hidden) in layer l's attention launch
    (`head_sparse_decode_attention(scores=...)`, the decode step's default,
    `dejavu_jax.sparse.SCORES_IN_ATTENTION`: that launch's few programs leave most SMs idle)
    or its out-projection launch (`head_sparse_out(scores=...)`; measured 1% slower than
    predict_sets' own scores kernel on an H100, `dejavu_jax.sparse.SCORES_IN_OUT_PROJECTION`),
    giving the heads and a `predict_sets.TileSets`;
  * the scatter of layer l+1's MLP set (`TileSets`) in layer l+1's q + K/V launch
    (`head_sparse_q_kv_update(scatter=...)`), giving idx and count before its MLP.

The program bodies are predict_sets' own (`scores_tile`, `scatter_tile`); here are the jobs'
types, their checks and their references (plain jax.numpy).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from pallas_kernels import _common as c
from pallas_kernels.predict_sets import (EPS, F32, I32, TileSets, auto_tuning, check_hidden, scatter_call,
                                         standardize)


# ----------------------------------------------------------------------------- hidden


class SideGemv(NamedTuple):
  """A GEMV that `head_sparse_q_kv_update` runs in its own launch, on programs after the q /
  K / V tiles: standardize(x) (parameter-free LayerNorm, ``eps`` in the square root, rounded
  to w's dtype) @ w[offset : offset + n].T, f32 accumulation -> f32 [1, n]. x [1, d]; w
  [N, d]; offset, n static ints. The lookahead predictors' first GEMV of the next layer
  (weights stored transposed: `stack_w1t`)."""
  x: jax.Array
  w: jax.Array
  offset: int
  n: int
  eps: float = 1e-5


def side_gemv_reference(g: SideGemv) -> jax.Array:
  """`SideGemv`'s f32 [1, n]."""
  w = jax.lax.slice_in_dim(g.w, g.offset, g.offset + g.n, axis=0)
  return jnp.einsum("bd,nd->bn", standardize(g.x, g.eps).astype(g.w.dtype), w, preferred_element_type=F32)


def check_side(g: SideGemv, d: int):
  c.check_array("side x", g.x, shape=(1, d), dtypes=c.FLOAT_DTYPES,
                hint="the side GEMV's input is one row of the model width.")
  c.check_array("side w", g.w, shape=(None, d), dtypes=c.FLOAT_DTYPES, hint="the side GEMV's rows are [N, d].")
  if not (isinstance(g.offset, int) and isinstance(g.n, int) and g.n >= 1 and 0 <= g.offset
          and g.offset + g.n <= g.w.shape[0]):
    raise ValueError(f"side rows [{g.offset!r}, {g.offset!r} + {g.n!r}) must be static ints inside the "
                     f"{g.w.shape[0]} rows of side w.")


def stack_w1t(mlp_w1: jax.Array, head_w1: jax.Array) -> jax.Array:
  """Both predictors' first weights [L, d, rm] and [L, d, rh] as rows: [L (rm + rh), d], layer
  l's MLP rows then its head rows (the layout `hidden_gemv` reads; one transposed copy)."""
  if mlp_w1.dtype != head_w1.dtype or mlp_w1.shape[:2] != head_w1.shape[:2]:
    raise ValueError(f"the predictors' w1 differ: {mlp_w1.dtype}{list(mlp_w1.shape)} and "
                     f"{head_w1.dtype}{list(head_w1.shape)} (same dtype, L and d needed).")
  L, d, _ = mlp_w1.shape
  return jnp.concatenate([mlp_w1, head_w1], axis=2).transpose(0, 2, 1).reshape(-1, d)


def hidden_gemv(x: jax.Array, w1t: jax.Array, layer: int, rm: int, rh: int) -> SideGemv:
  """Layer ``layer``'s first GEMV of both predictors, standardize(x) @ [w1_mlp | w1_head], as a
  `SideGemv` over `stack_w1t`'s rows (for `head_sparse_q_kv_update(side=...)`); its output
  is `predict_sets`' ``hidden``."""
  return SideGemv(x, w1t, layer * (rm + rh), rm + rh, EPS)


# ----------------------------------------------------------------------------- scatter


def scatter_sets_reference(ts: TileSets):
  """(idx [k]: the tiles' members in order, the first k, zeros after; count = min(total, k))."""
  n_tiles, tile = ts.loc.shape
  member = (jnp.arange(tile)[None, :] < ts.cnt[:, None]).reshape(-1)
  pos = jnp.nonzero(member, size=ts.k, fill_value=0)[0]
  total = jnp.sum(ts.cnt)
  idx = jnp.where(jnp.arange(ts.k) < total, ts.loc.reshape(-1)[pos], 0).astype(I32)
  return idx, jnp.minimum(total, ts.k).astype(I32)


def scatter_sets(ts: TileSets, impl: str = "triton"):
  """`scatter_sets_reference` as its own kernel (impl "triton"; interpret mode on the CPU) or XLA ops."""
  if impl in ("xla", "reference"):
    return scatter_sets_reference(ts)
  return scatter_call(ts.loc, ts.cnt, ts.k, warps=4, interpret=c.on_cpu())


# ----------------------------------------------------------------------------- scores


class ScoresJob(NamedTuple):
  """Layer ``layer``'s scores from its predictors' first GEMV ``hidden`` f32 [1, rm + rh] (MLP
  columns first): the MLP scores above ``thr`` compacted per tile of ``tile`` neurons (a
  `TileSets` with cap mlp_k) and the head_k best heads. Arrays: w2m [L rm, F], b2m [L, F],
  w2h [L rh, H], b2h [L, H] (the stacked predictors' second weights as rows), thr f32 [1].
  The ints are static: keep a job out of jit arguments."""
  hidden: jax.Array
  w2m: jax.Array
  b2m: jax.Array
  w2h: jax.Array
  b2h: jax.Array
  thr: jax.Array
  layer: int
  mlp_k: int
  head_k: int
  tile: int

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(rm, rh, F, H)."""
    L = self.b2m.shape[0]
    return self.w2m.shape[0] // L, self.w2h.shape[0] // L, self.w2m.shape[1], self.w2h.shape[1]

  @property
  def static(self) -> tuple:
    """`kernel_params` as sorted items: the hashable static argument a hosting kernel takes."""
    return tuple(sorted(self.kernel_params().items()))

  def sets(self, loc, cnt, heads):
    """The hosting kernel's (loc, cnt, heads) outputs -> (heads, `TileSets`)."""
    return heads, TileSets(loc, cnt, self.mlp_k)

  def kernel_params(self) -> dict:
    """`predict_sets.scores_tile`'s static keywords for this job (the hidden is one row)."""
    rm, rh, f, n_heads = self.shape
    return dict(layer=self.layer, n_split=1, rm=rm, rh=rh, f=f, n_heads=n_heads, tile=self.tile,
                n_tiles=c.cdiv(f, self.tile), head_k=self.head_k, dtm=self.w2m.dtype, dth=self.w2h.dtype,
                head_off=rm)


def scores_job(mlp, head, threshold, hidden, *, layer: int, mlp_k: int, head_k: int, tile: int = 0) -> ScoresJob:
  """The `ScoresJob` of stacked predictors (w1 [L, d, r], w2 [L, r, n], b2 [L, n]) on ``hidden``
  (`hidden_gemv`'s output); tile 0: `predict_sets.auto_tuning`'s."""
  (w1m, w2m, b2m), (_, w2h, b2h) = mlp, head
  L, d, rm = w1m.shape
  rh, f = w2h.shape[1], w2m.shape[2]
  check_hidden(hidden, rm, rh)
  return ScoresJob(hidden, w2m.reshape(L * rm, f), b2m, w2h.reshape(L * rh, w2h.shape[2]), b2h,
                   jnp.asarray(threshold, F32).reshape(1), layer, mlp_k, head_k, tile or auto_tuning(d, rm, f).tile)


def scores_job_reference(job: ScoresJob):
  """(heads [head_k] int32, best first, ties: lower index; `TileSets`: each tile's scores above
  thr, its members first, ascending, zeros after)."""
  rm, rh, f, n_heads = job.shape
  l = job.layer
  h = job.hidden[0]

  def scores(hh, w2, b2, r):
    w = jax.lax.slice_in_dim(w2, l * r, (l + 1) * r, axis=0)
    return jnp.einsum("r,rn->n", hh.astype(w.dtype), w, preferred_element_type=F32) + b2[l].astype(F32)

  heads = jax.lax.top_k(scores(h[rm:], job.w2h, job.b2h, rh), job.head_k)[1].astype(I32)
  n_tiles = c.cdiv(f, job.tile)
  s = jnp.pad(scores(h[:rm], job.w2m, job.b2m, rm), (0, n_tiles * job.tile - f), constant_values=-jnp.inf)
  take = (s > job.thr[0]).reshape(n_tiles, job.tile)
  col = jnp.arange(n_tiles * job.tile, dtype=I32).reshape(n_tiles, job.tile)
  order = jnp.argsort(~take, axis=1, stable=True)  # members first, each group in lane order
  loc = jnp.where(jnp.take_along_axis(take, order, 1), jnp.take_along_axis(col, order, 1), 0)
  return heads, TileSets(loc, take.sum(1).astype(I32), job.mlp_k)
