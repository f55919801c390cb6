"""Mosaic GPU (Pallas `plgpu.kernel`) sparse MLP for batch 1.

One warpgroup (128 threads) per CTA; CTA g owns a contiguous run of selected neurons, an
equal share of the first `count` (so a threshold's short set still spreads over every CTA).
For each group of R neurons it issues the 2R row loads (w1 and w2t rows, each [d]
read as 16-byte vectors, coalesced across the warpgroup) before using any of them,
then computes h_j = relu(x . w1[j] + b1[j]) (a warpgroup reduction) and accumulates
h_j * w2t[j] into an f32 [d] accumulator held in registers. The hidden activations
never leave registers. Each CTA either writes one f32 [d] partial, summed afterwards in XLA
(`_partials`), or adds its accumulator into a caller's f32 [G, 1, d] buffer with f32 atomics
(`red.global.add`; `_accumulate`), CTA g into copy g % G: no partials, no summing kernel.
With G = 1 every CTA adds into the same d addresses at about the same time; more copies
spread those atomics (the reader sums the G copies). Atomics make the sum's order, and so
its last bits, vary from run to run. JAX's GPU interpreter has no atomics, so
in interpret mode `_accumulate` runs the same kernel body writing partials and adds their
sum to the buffer.

Plain vectorized global loads: Hopper's TMA has no gather and a row is one contiguous
d-long run, so a row-load per thread-vector is already a full-width access. The TMA variant
(`MosaicMLPTuning(tma=True)`, `_kernel_tma`) copies each row into a ring of shared-memory
slots instead, several groups ahead, so the bytes in flight are not bounded by registers.
Groups past `count` are skipped (dynamic loop bound), so those rows are never read.
Shapes: d a multiple of 1024 (bf16) so each thread loads whole 16-byte vectors.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common as c


@dataclasses.dataclass(frozen=True)
class MosaicMLPTuning:
  """rows_per_group: neurons whose rows are loaded together (R); ctas: grid (0 = auto:
  up to 2 CTAs per SM, each with at least R neurons); pipeline: issue group i+1's 2R row
  loads before computing group i (the rows of two groups live in registers; the last group
  re-reads its own rows, from L2, instead of reading past its share). tma: the rows come by
  TMA copies into a ring of shared-memory slots, `stages` groups ahead (0: as many as
  `TMA_SMEM_BYTES` holds), so the bytes in flight do not depend on registers; auto CTAs: one
  an SM (`_kernel_tma`). Not with pipeline or pdl."""
  rows_per_group: int = 0
  ctas: int = 0
  pipeline: bool = False
  pdl: bool = False
  tma: bool = False
  stages: int = 0

  def __post_init__(self):
    if self.tma and (self.pipeline or self.pdl):
      raise ValueError(f"MosaicMLPTuning: tma=True is its own pipeline, without pipeline or pdl; got {self}.")
    if self.stages < 0 or (self.stages and not self.tma):
      raise ValueError(f"MosaicMLPTuning: stages ({self.stages}) is the TMA ring's depth: >= 0, with tma=True.")


# Shared memory a CTA of the TMA kernel gives its ring of row slots (an H100 CTA may hold 227 KB).
TMA_SMEM_BYTES = 192 * 1024
TMA_COLS = 256  # a TMA box is at most 256 elements a dimension: rows are copied as [d / 256, 256]


# Programmatic dependent launch (Hopper): the kernel may start while the kernel before it in the
# stream ends. It loads its first group's rows (the set and the weights, written by earlier
# kernels), then waits for the previous kernel (`griddepcontrol.wait`) before it reads x. The
# default of `partials` / `sparse_mlp_mosaic` when no tuning is given (`default_tuning`).
PDL = False
# The TMA ring (`_kernel_tma`) as the default of a call that names no tuning (takes precedence
# over PDL, which it does not do).
TMA = False


def supported(x, w1, mask) -> bool:
  return (x.shape[0] == 1 and mask is None
          and w1.shape[1] % (128 * 16 // jnp.dtype(w1.dtype).itemsize) == 0)


def default_tuning() -> MosaicMLPTuning:
  """The tuning of a call that names none: auto rows and CTAs, `TMA` or else `PDL` as set now."""
  return MosaicMLPTuning(tma=True) if TMA else MosaicMLPTuning(pdl=PDL)


def _auto(t: MosaicMLPTuning, k: int, d: int, sms: int) -> tuple[int, int]:
  # Registers, H100 runs (NOTES.md): 4 rows per group up to d = 2048, 2 up to 9216 (3-5% faster than
  # 1 at 5120-9216), 1 above (2 x 12288-wide rows per matrix no longer fit the registers).
  # TMA: 1 (a group's rows past the count are re-read; the ring holds groups, not registers)
  r = t.rows_per_group or (1 if t.tma or d > 9216 else 4 if d <= 2048 else 2)
  ctas = t.ctas or max(1, min((1 if t.tma else 2) * sms, c.cdiv(k, r)))
  return r, ctas


def tma_stages(t: MosaicMLPTuning, r: int, d: int, itemsize: int) -> int:
  """The TMA ring's depth in groups: `stages`, or as many groups of 2r rows as fit
  `TMA_SMEM_BYTES` (at least 1, at most 8). A row has its own barrier, and Mosaic GPU tracks at
  most 32 barriers of an array: stages * 2r <= 32."""
  most = 32 // (2 * r)
  stages = t.stages or max(1, min(8, most, TMA_SMEM_BYTES // (2 * r * d * itemsize)))
  if stages > most:
    raise ValueError(f"MosaicMLPTuning: {stages} stages of {r} rows need {stages * 2 * r} barriers; "
                     f"Mosaic GPU tracks at most 32 (stages <= {most}).")
  return stages


def _add_group(acc, x, w1s, w2s, rows, ok, b1_ref):
  """acc + sum over a group's neurons u of relu(x . w1s[u] + b1[rows[u]]) * w2s[u], in f32; a
  neuron past the count (not ok[u]) adds 0. Both kernels' arithmetic (the hidden activation
  never leaves registers)."""
  for u, (w1, w2) in enumerate(zip(w1s, w2s)):
    pre = jnp.sum(w1.astype(jnp.float32) * x)
    if b1_ref is not None:
      pre = pre + b1_ref[rows[u]].astype(jnp.float32)
    h = jnp.where(ok[u], jnp.maximum(pre, 0.0), 0.0)
    acc = acc + w2.astype(jnp.float32) * h
  return acc


def _share(count_ref, g, *, k, ctas, r):
  """CTA g's part of the live count -> (count clamped to [0, k], its first position, its
  groups of r). The share follows the live count, not the static k: with a threshold the
  count can be a fraction of k, and a split by k would leave the tail CTAs idle and the head
  ones reading alone."""
  count = jnp.clip(count_ref[0], 0, k)
  share = ((count + (ctas * r - 1)) // (ctas * r)) * r
  start = g * share
  return count, start, (jnp.clip(count - start, 0, share) + (r - 1)) // r


def _kernel(count_ref, idx_ref, x_ref, w1_ref, b1_ref, w2_ref, *refs, r, ctas, d, k,
            has_b1, pipeline=False, into=False, pdl=False, early=False, boundary=None):
  """refs: (part_ref,): f32 [ctas, d] partials, or with ``into`` f32 [G, 1, d], a mutable
  buffer: CTA g atomically adds its sum into copy g % G. With ``boundary`` ((has_bias, eps)):
  refs = (delta, bias, scale, shift, part_ref, xo_ref) and x is the residual stream: the
  kernel's input is LayerNorm(x + (delta + bias)) (`_boundary_input`)."""
  if boundary is not None:
    *ln_refs, part_ref, xo_ref = refs
  else:
    part_ref, = refs
  g = lax.axis_index("g")
  count, start, n_groups = _share(count_ref, g, k=k, ctas=ctas, r=r)
  vec = 16 // jnp.dtype(w1_ref.dtype).itemsize  # 16-byte loads of the weight rows
  layout = plgpu.Layout.WG_STRIDED((d,), vec_size=vec)
  load = lambda ref: plgpu.load(ref, layout=layout)

  def rows_of(i):
    base = start + i * r
    ok = [base + u < count for u in range(r)]
    if early:  # a group loaded before any check of n_groups: row 0 past the count
      return [jnp.where(ok[u], idx_ref[jnp.where(ok[u], base + u, 0)], 0) for u in range(r)], ok
    # positions past count re-read the group's first row (never past the end of idx)
    return [idx_ref[jnp.where(ok[u], base + u, base)] for u in range(r)], ok

  def fetch(i):  # issue all 2r row loads of group i
    rows, _ = rows_of(i)
    return [load(w1_ref.at[row]) for row in rows], [load(w2_ref.at[row]) for row in rows]

  def compute(i, acc, w1s, w2s):
    return _add_group(acc, x, w1s, w2s, *rows_of(i), b1_ref if has_b1 else None)

  first = fetch(0) if early else None  # the rows of group 0, before the wait
  if pdl:
    plgpu.griddepcontrol_wait()  # the previous kernel (x's writer) has ended; its writes are visible
  if boundary is not None:
    x = _boundary_input(x_ref, *ln_refs, xo_ref, load, g, d, *boundary)
  else:
    x = load(x_ref.at[0]).astype(jnp.float32)  # [d]
  if pipeline:
    def group(i, carry):
      acc, w1s, w2s = carry
      nxt = fetch(jnp.minimum(i + 1, n_groups - 1))
      return (compute(i, acc, w1s, w2s), *nxt)

    acc = lax.fori_loop(0, n_groups, group, (x * 0.0, *(first if first is not None else fetch(0))))[0]
  elif early:  # group 0 from the rows loaded before the wait (all masked off where there is none)
    acc = lax.fori_loop(1, n_groups, lambda i, acc: compute(i, acc, *fetch(i)), compute(0, x * 0.0, *first))
  else:
    acc = lax.fori_loop(0, n_groups, lambda i, acc: compute(i, acc, *fetch(i)), x * 0.0)
  if into:
    plgpu.atomic_add(part_ref.at[lax.rem(g, part_ref.shape[0]), 0], acc)
  else:
    part_ref[g] = acc


def _kernel_tma(count_ref, idx_ref, x_ref, w1_ref, b1_ref, w2_ref, part_ref, w1_s, w2_s, bars, *, r, ctas,
                stages, k, has_b1):
  """`_kernel`'s shares and arithmetic, the rows by TMA: w1 / w2 rows [d / 256, 256] (a row
  viewed as TMA boxes), group i's 2r rows copied into slot i % stages of w1_s / w2_s [stages,
  r, d / 256, 256], each row on its own barrier (bars: stages * 2r). The first `stages` groups
  are issued up front; after computing group i, the warpgroup issues group i + stages into the
  slot it has just read (Pallas puts a warpgroup barrier before each copy, so every thread's
  reads of the slot are done). Positions past the count (in a CTA's last group, r > 1) copy
  the CTA's first row again and count as h = 0 (JAX's GPU interpreter has no predicated copy)."""
  g = lax.axis_index("g")
  count, start, n_groups = _share(count_ref, g, k=k, ctas=ctas, r=r)
  layout = plgpu.Layout.WG_STRIDED(tuple(w1_s.shape[2:]), vec_size=16 // jnp.dtype(w1_ref.dtype).itemsize)

  def rows_of(i):
    pos = [start + i * r + u for u in range(r)]
    ok = [p < count for p in pos]
    return [idx_ref[jnp.where(ok[u], pos[u], start)] for u in range(r)], ok

  def issue(i):  # group i's 2r rows into slot i % stages
    slot = lax.rem(i, stages)
    rows, _ = rows_of(i)
    for u in range(r):
      plgpu.copy_gmem_to_smem(w1_ref.at[rows[u]], w1_s.at[slot, u], bars.at[slot * 2 * r + u])
      plgpu.copy_gmem_to_smem(w2_ref.at[rows[u]], w2_s.at[slot, u], bars.at[slot * 2 * r + r + u])

  for s in range(stages):
    @pl.when(s < n_groups)
    def _(s=s):
      issue(jnp.int32(s))

  x = plgpu.load(x_ref.at[0], layout=layout).astype(jnp.float32)

  def group(i, acc):
    slot = lax.rem(i, stages)
    rows, ok = rows_of(i)
    for j in range(2 * r):
      plgpu.barrier_wait(bars.at[slot * 2 * r + j])
    w1s = [plgpu.load(w1_s.at[slot, u], layout=layout) for u in range(r)]
    w2s = [plgpu.load(w2_s.at[slot, u], layout=layout) for u in range(r)]
    acc = _add_group(acc, x, w1s, w2s, rows, ok, b1_ref if has_b1 else None)

    @pl.when(i + stages < n_groups)
    def _():
      issue(i + stages)
    return acc

  part_ref[g] = lax.fori_loop(0, n_groups, group, x * 0.0)


def _tma_partials(x, w1, b1, w2t, idx, count, *, tuning: MosaicMLPTuning, interpret):
  """`_partials` by `_kernel_tma`: the same f32 [ctas, d] partials."""
  d = x.shape[1]
  k, f = idx.shape[0], w1.shape[0]
  r, ctas = _grid(tuning, k, d)
  stages = tma_stages(tuning, r, d, jnp.dtype(w1.dtype).itemsize)
  view = (d // TMA_COLS, TMA_COLS)
  kernel = functools.partial(_kernel_tma, r=r, ctas=ctas, stages=stages, k=k, has_b1=b1 is not None)
  extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  slots = plgpu.SMEM((stages, r, *view), w1.dtype)
  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ctas, *view), jnp.float32), grid=(ctas,),
                      grid_names=("g",), scratch_types=(slots, slots, plgpu.Barrier(num_barriers=stages * 2 * r)),
                      **extra)
  part = call(count, idx, x.reshape(1, *view), w1.reshape(f, *view), w1 if b1 is None else b1,
              w2t.reshape(f, *view))
  return part.reshape(ctas, d)


def _boundary_input(x_ref, delta_ref, bias_ref, scale_ref, shift_ref, xo_ref, load, g, d, has_bias, eps):
  """The pre-MLP boundary in each CTA (the arithmetic of `pallas_kernels.layer_norm`'s kernels):
  x_new = x + (delta + bias) rounded as XLA rounds it, h = LayerNorm(x_new) rounded to x's
  dtype -> h in f32, the MLP's input. CTA 0 stores x_new (the residual stream)."""
  from pallas_kernels.layer_norm import _layer_norm_row, _residual

  delta = load(delta_ref.at[0])
  if has_bias:
    delta = delta.astype(jnp.float32) + load(bias_ref.at[:]).astype(jnp.float32)
  x_new = _residual(load(x_ref.at[0]), delta)
  h = _layer_norm_row(x_new, load(scale_ref.at[:]), load(shift_ref.at[:]), d, eps)

  @pl.when(g == 0)
  def _():
    xo_ref[0] = x_new
  return h.astype(x_ref.dtype).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("eps", "tuning", "interpret"))
def boundary_partials(x, delta, bias, scale, shift, w1, b1, w2t, idx, count, *, eps: float,
                      tuning: MosaicMLPTuning | None = None, interpret: bool = False):
  """x [1, d] (the residual stream), delta [1, d] (the sublayer's output, any float dtype),
  bias / scale / shift [d] -> (f32 [ctas, d] partials of the sparse MLP of h = LayerNorm(x +
  (delta + bias)), x_new [1, d] in x.dtype): the boundary before the MLP computed by every CTA
  of the MLP kernel (no kernel of its own), while the first group's rows are in flight (rows
  past the count read row 0, as with PDL). Register kernel only (not tuning.tma)."""
  tuning = tuning or MosaicMLPTuning(pdl=PDL)
  if tuning.tma:
    raise ValueError("boundary_partials: the boundary runs in the register kernel; tuning.tma is not supported.")
  d = x.shape[1]
  k = idx.shape[0]
  r, ctas = _grid(tuning, k, d)
  kernel = functools.partial(_kernel, r=r, ctas=ctas, d=d, k=k, has_b1=b1 is not None, pipeline=tuning.pipeline,
                             pdl=tuning.pdl and not interpret, early=True, boundary=(bias is not None, float(eps)))
  kernel.__name__ = "dejavu_boundary_mlp"  # its name in profiles
  extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  call = plgpu.kernel(kernel, out_type=(jax.ShapeDtypeStruct((ctas, d), jnp.float32),
                                        jax.ShapeDtypeStruct((1, d), x.dtype)),
                      grid=(ctas,), grid_names=("g",), **extra)
  return call(c.count_array(count, k), idx, x, w1, w1 if b1 is None else b1, w2t, delta,
              scale if bias is None else bias, scale, shift)


def _grid(tuning: MosaicMLPTuning, k: int, d: int) -> tuple[int, int]:
  r, ctas = _auto(tuning, k, d, c.num_sms())
  per_cta = c.cdiv(c.cdiv(k, ctas), r) * r
  return r, c.cdiv(k, per_cta)  # no CTA without work


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _partials(x, w1, b1, w2t, idx, count, *, tuning: MosaicMLPTuning, interpret):
  """x [1, d] (any float dtype), idx [k], count [1] -> f32 [ctas, d] partial outputs."""
  if tuning.tma:
    return _tma_partials(x, w1, b1, w2t, idx, count, tuning=tuning, interpret=interpret)
  d = x.shape[1]
  k = idx.shape[0]
  r, ctas = _grid(tuning, k, d)
  kernel = functools.partial(_kernel, r=r, ctas=ctas, d=d, k=k, has_b1=b1 is not None,
                             pipeline=tuning.pipeline, pdl=tuning.pdl and not interpret, early=tuning.pdl)
  extra = {}
  if interpret:
    extra["interpret"] = plgpu.InterpretGPUParams()
  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ctas, d), jnp.float32),
                      grid=(ctas,), grid_names=("g",), **extra)
  return call(count, idx, x, w1, w1 if b1 is None else b1, w2t)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _accumulate(x, w1, b1, w2t, idx, count, acc, *, tuning: MosaicMLPTuning, interpret):
  """acc f32 [G, 1, d] with the MLP's f32 sum (no b2) added: CTA g's share atomically into copy
  g % G of acc's buffer (aliased to the output, so under jit with acc dead afterwards no
  copy). Interpret mode: the same shares from `_partials` (see the module docstring)."""
  if tuning.tma:
    raise ValueError("sparse_mlp_mosaic: acc= (an in-kernel atomic sum) needs the register kernel; "
                     "the TMA kernel (tuning.tma) writes partials only.")
  if interpret:
    part = _partials(x, w1, b1, w2t, idx, count, tuning=tuning, interpret=True)
    copies = jax.ops.segment_sum(part, jnp.arange(part.shape[0]) % acc.shape[0], num_segments=acc.shape[0])
    return acc + copies[:, None]
  d = x.shape[1]
  k = idx.shape[0]
  r, ctas = _grid(tuning, k, d)
  kernel = functools.partial(_kernel, r=r, ctas=ctas, d=d, k=k, has_b1=b1 is not None,
                             pipeline=tuning.pipeline, pdl=tuning.pdl, early=tuning.pdl, into=True)
  buf = jax.new_ref(acc)  # a mutable operand: the kernel adds into its buffer in place
  plgpu.kernel(kernel, out_type=(), grid=(ctas,), grid_names=("g",))(
      count, idx, x, w1, w1 if b1 is None else b1, w2t, buf)
  return jax.freeze(buf)


def partials(x, w1, b1, w2t, idx, count, *, interpret=False, tuning: MosaicMLPTuning | None = None):
  """x [1, d] -> f32 [ctas, d]: each CTA's share of the MLP's f32 sum (no b2), unsummed."""
  return _partials(x, w1, b1, w2t, idx, c.count_array(count, idx.shape[0]), tuning=tuning or default_tuning(),
                   interpret=interpret)


def sparse_mlp_mosaic(x, w1, b1, w2t, b2, idx, mask, count, *, interpret=False,
                      tuning: MosaicMLPTuning | None = None, out_dtype=None, acc=None):
  """Batch-1 sparse MLP on Mosaic GPU (1 kernel + 1 XLA reduction); other cases go to
  the Triton kernels. Result in ``out_dtype`` (default x.dtype). ``acc`` (f32 [1, d] or
  [G, 1, d]): the result is acc with the f32 sum (+ b2) added, in f32, the sum added in-kernel
  by atomics (one kernel), spread over the G copies (their sum is the result)."""
  if not supported(x, w1, mask):
    from pallas_kernels import sparse_mlp as sm
    out = sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, mask, count=count, impl="triton",
                               checked=False, out_dtype=jnp.float32 if acc is not None else out_dtype)
    return out if acc is None else c.add_to_first(acc, out)
  k = idx.shape[0]
  if acc is not None:
    out = _accumulate(x, w1, b1, w2t, idx, c.count_array(count, k), acc if acc.ndim == 3 else acc[None],
                      tuning=tuning or default_tuning(), interpret=interpret)
    out = out if acc.ndim == 3 else out[0]
    return out if b2 is None else c.add_to_first(out, b2.astype(jnp.float32))
  out = partials(x, w1, b1, w2t, idx, count, interpret=interpret, tuning=tuning).sum(0, keepdims=True)
  if b2 is not None:
    out = out + b2.astype(jnp.float32)
  return out.astype(out_dtype or x.dtype)
