"""Residual add + LayerNorm of a decode step's rows in one kernel, with reference.

    add_layer_norm(x, delta, scale, shift, eps=1e-5, bias=None)
        == add_layer_norm_reference(...)  -> (x_new, h), both [B, d] in x.dtype
    x_new = x + (delta + bias)           (delta + bias in f32, cast to x.dtype, the sum
                                          rounded to it: a sublayer's output as XLA rounds it)
    h     = LayerNorm(x_new) * scale + shift   (statistics in f32, over the last axis)

This is the pre-LayerNorm block boundary of an OPT layer: the residual stream takes the
attention's (or the MLP's) output, and the next sublayer reads its LayerNorm. Semantics are
those of `dejavu_jax.model.layer_norm` applied to ``x + delta``.

Why: as XLA ops this boundary costs three kernels a LayerNorm at batch 1 (the mean, the
variance, the normalization: 4.5-6.5 us a boundary at the OPT-13B shape on an H100, twice a
layer; `scripts/profile_decode_step.py`), for 30 KB of data. Here one program per row holds
the whole row in registers: one read of x and delta, two reductions, two stores.

Backends (`impl`): "triton" (Pallas lowered through Triton; on the CPU in interpret mode),
"mosaic" (Pallas Mosaic GPU, one warpgroup a row; d a multiple of 512, delta [B, d], else
Triton), "xla" and "reference" (the jnp reference), "auto" (what `pallas_kernels.dispatch`
names for "add_layer_norm"). The kernel moves 30 KB and is launch-bound either way; the
Mosaic one exists for programmatic dependent launch (`PDL`): it lets the kernel after it
start at once (a Mosaic MLP that loads its first weight rows before it waits for this one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltr

from pallas_kernels import _common as c

F32 = jnp.float32
SPLIT_BLOCK_D = 64  # columns a program of the split kernel sums
SPLIT_ROW_BLOCK = 32  # partials a tile of its loads holds


def add_layer_norm_reference(x, delta, scale, shift, eps: float = 1e-5, bias=None, recycle: bool = False,
                             arrivals=None):
  """(x + (delta + bias) in x.dtype, its LayerNorm in x.dtype), the statistics in f32; delta
  [S, B, d] (f32 copies or partials): their sum, in order; ``recycle``: and zeros like delta
  (the kernel writes them into delta's buffer); ``arrivals``: and zeros like it (the split
  kernel's per-row counts, zero again when it ends)."""
  if arrivals is not None:
    return (*add_layer_norm_reference(x, delta, scale, shift, eps, bias), jnp.zeros_like(arrivals))
  if recycle:
    return (*add_layer_norm_reference(x, delta, scale, shift, eps, bias), jnp.zeros_like(delta))
  if delta.ndim == 3:
    delta = functools.reduce(jnp.add, list(delta))
  if bias is not None:
    delta = delta.astype(F32) + bias.astype(F32)
  x_new = x + delta.astype(x.dtype)
  xf = x_new.astype(F32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  return x_new, (y * scale.astype(F32) + shift.astype(F32)).astype(x.dtype)


def _kernel(x_ref, delta_ref, bias_ref, scale_ref, shift_ref, xo_ref, h_ref, *zero_ref, d, d_pad, eps,
            has_bias):
  b = pl.program_id(0)
  cols = jnp.arange(d_pad)
  ok = cols < d
  x = pltr.load(x_ref.at[b, cols], mask=ok, other=0)
  at = (lambda i: (i, b, cols)) if len(delta_ref.shape) == 3 else (lambda i: (b, cols))
  copies = delta_ref.shape[0] if len(delta_ref.shape) == 3 else 1
  delta = pltr.load(delta_ref.at[at(0)], mask=ok, other=0)
  for i in range(1, copies):  # f32 copies of one sum, added in order
    delta = delta + pltr.load(delta_ref.at[at(i)], mask=ok, other=0)
  for i in range(copies if zero_ref else 0):  # recycle: delta's buffer (aliased) zeroed for the next sum
    pltr.store(zero_ref[0].at[at(i)], jnp.zeros_like(delta), mask=ok)
  if has_bias:
    delta = delta.astype(F32) + pltr.load(bias_ref.at[cols], mask=ok, other=0).astype(F32)
  x_new = _residual(x, delta)
  h = _normalized(x_new, ok, scale_ref, shift_ref, cols, d, eps)
  pltr.store(xo_ref.at[b, cols], x_new, mask=ok)  # both stores after the statistics, as measured
  pltr.store(h_ref.at[b, cols], h.astype(h_ref.dtype), mask=ok)


def _residual(x, delta):
  """x + delta rounded to x's dtype first, then the sum rounded to it: as XLA rounds a sublayer's
  output and the residual add."""
  return (x.astype(F32) + delta.astype(x.dtype).astype(F32)).astype(x.dtype)


def _normalized(x_new, ok, scale_ref, shift_ref, cols, d, eps):
  """LayerNorm of a whole row (the ``ok`` lanes of it), statistics in f32 -> f32 (Triton)."""
  scale = pltr.load(scale_ref.at[cols], mask=ok, other=0)
  shift = pltr.load(shift_ref.at[cols], mask=ok, other=0)
  return _layer_norm_row(x_new, scale, shift, d, eps, ok)


def _layer_norm_row(x_new, scale, shift, d, eps, ok=None):
  """The arithmetic of every kernel's LayerNorm of a row of d (lanes past ``ok`` held as 0):
  mean and variance in f32, then scale and shift, in f32."""
  xf = x_new.astype(F32)
  mean = jnp.sum(xf) / d
  centred = xf - mean if ok is None else jnp.where(ok, xf - mean, 0.0)
  var = jnp.sum(centred * centred) / d
  return centred * lax.rsqrt(var + eps) * scale.astype(F32) + shift.astype(F32)


def _split_kernel(x_ref, part_ref, bias_ref, scale_ref, shift_ref, _count_in, xo_ref, h_ref, count_ref, *, d,
                  d_pad, eps, has_bias, block_d, row_block, programs, barrier):
  """One program a (row b, column block j): the partials' sum of its columns, x_new's columns;
  the row's last program to arrive (counted in ``count_ref``) normalizes the whole row."""
  b, j = pl.program_id(0), pl.program_id(1)
  cols = j * block_d + jnp.arange(block_d)
  ok = cols < d
  n = part_ref.shape[0]
  delta = jnp.zeros((block_d,), F32)
  for r0 in range(0, n, row_block):  # all tiles' loads independent: in flight together
    rows = r0 + jnp.arange(row_block)
    tile = pltr.load(part_ref.at[rows[:, None], b, cols[None, :]], mask=(rows < n)[:, None] & ok[None, :], other=0)
    delta = delta + jnp.sum(tile, axis=0)
  if has_bias:
    delta = delta + pltr.load(bias_ref.at[cols], mask=ok, other=0).astype(F32)
  x = pltr.load(x_ref.at[b, cols], mask=ok, other=0)
  x_new = _residual(x, delta)
  pltr.store(xo_ref.at[b, cols], x_new, mask=ok)
  if barrier:  # every thread's stores issued before the release (no-op need in interpret mode)
    pltr.debug_barrier()
  ticket = pltr.atomic_add(count_ref, (b,), jnp.int32(1))  # acquire-release, GPU scope

  @pl.when(ticket == programs - 1)
  def _normalize():  # the other programs' x_new columns are visible after the acquire
    every = jnp.arange(d_pad)
    fine = every < d
    h = _normalized(pltr.load(xo_ref.at[b, every], mask=fine, other=0), fine, scale_ref, shift_ref, every, d, eps)
    pltr.store(h_ref.at[b, every], h.astype(h_ref.dtype), mask=fine)
    count_ref[b] = jnp.int32(0)  # zero again for the next boundary


# The Mosaic kernel as a programmatic dependent launch (Hopper): it waits for the kernel before it
# (delta's writer), and first lets the kernel after it launch (`griddepcontrol.launch_dependents`),
# which must itself wait before it reads this one's outputs. No effect in interpret mode.
PDL = False


def mosaic_supported(x, delta) -> bool:
  """Rows the Mosaic kernel takes: d a multiple of 512 (16-byte f32 vectors over a warpgroup),
  one delta (not copies or partials)."""
  return delta.ndim == 2 and x.shape[1] % 512 == 0


def _mosaic_kernel(x_ref, delta_ref, bias_ref, scale_ref, shift_ref, xo_ref, h_ref, *, d, eps, has_bias, pdl):
  """One warpgroup a row (CTA b): the Triton kernel's arithmetic (`_residual`, `_layer_norm_row`)
  on a WG-strided row."""
  b = lax.axis_index("b")
  if pdl:
    plgpu.griddepcontrol_launch_dependents()
    plgpu.griddepcontrol_wait()
  layout = plgpu.Layout.WG_STRIDED((d,), vec_size=4)
  load = lambda ref: plgpu.load(ref, layout=layout)
  x = load(x_ref.at[b])
  delta = load(delta_ref.at[b])
  if has_bias:
    delta = delta.astype(F32) + load(bias_ref.at[:]).astype(F32)
  x_new = _residual(x, delta)
  h = _layer_norm_row(x_new, load(scale_ref.at[:]), load(shift_ref.at[:]), d, eps)
  xo_ref[b] = x_new
  h_ref[b] = h.astype(h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "pdl"))
def _add_layer_norm_mosaic(x, delta, scale, shift, bias=None, *, eps: float, interpret: bool, pdl: bool):
  b, d = x.shape
  kernel = functools.partial(_mosaic_kernel, d=d, eps=float(eps), has_bias=bias is not None,
                             pdl=pdl and not interpret)
  kernel.__name__ = "dejavu_add_layer_norm_mosaic"  # its name in profiles (a boundary kernel)
  extra = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
  call = plgpu.kernel(kernel, out_type=(jax.ShapeDtypeStruct((b, d), x.dtype),) * 2, grid=(b,), grid_names=("b",),
                      **extra)
  return call(x, delta, scale if bias is None else bias, scale, shift)


NUM_WARPS = 0  # 0: from the row's width (num_warps); else this many warps in every boundary kernel


def num_warps(d: int) -> int:
  """Warps for a row of d: about 32 elements a thread, 4 to 16 warps (or `NUM_WARPS`)."""
  return NUM_WARPS or max(4, min(16, c.next_pow2(d) // 1024))


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "recycle"))
def _add_layer_norm_triton(x, delta, scale, shift, bias=None, *, eps: float, interpret: bool, recycle: bool = False):
  b, d = x.shape
  kernel = functools.partial(_kernel, d=d, d_pad=c.next_pow2(d), eps=float(eps),
                             has_bias=bias is not None)
  out_shape = (jax.ShapeDtypeStruct((b, d), x.dtype), jax.ShapeDtypeStruct((b, d), x.dtype))
  if recycle:
    out_shape += (jax.ShapeDtypeStruct(delta.shape, delta.dtype),)
  return pl.pallas_call(
      kernel, out_shape=out_shape, input_output_aliases={1: 2} if recycle else {},
      grid=(b,), compiler_params=pltr.CompilerParams(num_warps=num_warps(d), num_stages=1),
      interpret=interpret, name="dejavu_add_layer_norm",
  )(x, delta, scale if bias is None else bias, scale, shift)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block_d", "row_block"))
def _add_layer_norm_split(x, part, scale, shift, arrivals, bias=None, *, eps: float, interpret: bool,
                          block_d: int | None = None, row_block: int | None = None):
  b, d = x.shape
  block_d, row_block = block_d or SPLIT_BLOCK_D, row_block or SPLIT_ROW_BLOCK
  block_d = min(block_d, c.next_pow2(d))
  programs = c.cdiv(d, block_d)
  kernel = functools.partial(_split_kernel, d=d, d_pad=c.next_pow2(d), eps=float(eps), has_bias=bias is not None,
                             block_d=block_d, row_block=min(row_block, c.next_pow2(part.shape[0])),
                             programs=programs, barrier=not interpret)
  out_shape = (jax.ShapeDtypeStruct((b, d), x.dtype), jax.ShapeDtypeStruct((b, d), x.dtype),
               jax.ShapeDtypeStruct(arrivals.shape, jnp.int32))
  return pl.pallas_call(
      kernel, out_shape=out_shape, input_output_aliases={5: 2}, grid=(b, programs),
      compiler_params=pltr.CompilerParams(num_warps=num_warps(d), num_stages=1),
      interpret=interpret, name="dejavu_add_layer_norm_split",
  )(x, part, scale if bias is None else bias, scale, shift, arrivals)


def check_args(x, delta, scale, shift, eps, bias=None) -> None:
  """add_layer_norm's arguments (also those of `pallas_kernels.boundary_mlp`): clear errors."""
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES, hint="x is the residual stream, [batch, d].")
  c.check_array("delta", delta, shape=x.shape if getattr(delta, "ndim", 2) == 2 else (None, *x.shape),
                dtypes=c.FLOAT_DTYPES if getattr(delta, "ndim", 2) == 2 else (jnp.float32,),
                hint="delta is the sublayer's output, the shape of x (or f32 [copies, *x.shape]).")
  c.check_array("scale", scale, shape=(x.shape[1],), dtypes=c.FLOAT_DTYPES, hint="scale is [d].")
  c.check_array("shift", shift, shape=(x.shape[1],), dtypes=c.FLOAT_DTYPES, hint="shift is [d].")
  if bias is not None:
    c.check_array("bias", bias, shape=(x.shape[1],), dtypes=c.FLOAT_DTYPES,
                  hint="bias is the sublayer's output bias, [d].")
  if not eps > 0:
    raise ValueError(f"eps must be positive, got {eps}.")


def add_layer_norm(x, delta, scale, shift, eps: float = 1e-5, *, bias=None, impl: str = "auto",
                   recycle: bool = False, arrivals=None):
  """x [B, d] + (delta [B, d] (any float dtype) + bias [d] or None, cast to x's dtype), then
  LayerNorm with scale / shift [d] -> (x_new, h), both [B, d] in x.dtype. See the module
  docstring. delta may be f32 [S, B, d]: S copies of one sum (`sparse_mlp(acc=)`), added in
  order. ``recycle`` (delta f32): also returns zeros like delta, which the kernel writes
  into delta's buffer (aliased) after reading it: the decode step hands that buffer to the
  next kernel that adds its sum into one (`sparse_mlp(acc=)`, `head_sparse_out(acc=)`).
  ``arrivals`` (int32 [B], zeros): delta is f32 partials [S, B, d] (`sparse_mlp(unsummed=True)`,
  `head_sparse_out(unsummed=True)`) summed by the kernel itself, over many programs (column
  blocks); each counts its arrival in ``arrivals`` (aliased) and a row's last program
  normalizes the row and zeroes its count: returns (x_new, h, zeros), the zeros for the next
  such call. One kernel instead of an XLA reduction and this one."""
  check_args(x, delta, scale, shift, eps, bias)
  if recycle and delta.dtype != jnp.float32:
    raise ValueError(f"recycle zeroes delta's buffer for a later f32 sum; delta is {delta.dtype}, not float32.")
  if arrivals is not None:
    if recycle:
      raise ValueError("recycle and arrivals are two ways to hand delta over; pass one.")
    if delta.ndim != 3:
      raise ValueError(f"with arrivals, delta must be f32 partials [S, batch, d]; got shape {delta.shape}.")
    c.check_array("arrivals", arrivals, shape=(x.shape[0],), dtypes=(jnp.int32,),
                  hint="arrivals is int32 [batch], zeros (returned zeroed by the previous call).")
  impl = c.resolve_impl(impl, "add_layer_norm", x.shape[0])
  if impl in ("xla", "reference"):
    return add_layer_norm_reference(x, delta, scale, shift, eps, bias, recycle, arrivals)
  if arrivals is not None:
    return _add_layer_norm_split(x, delta, scale, shift, arrivals, bias, eps=float(eps), interpret=c.on_cpu())
  if impl == "mosaic" and not recycle and mosaic_supported(x, delta):
    return _add_layer_norm_mosaic(x, delta, scale, shift, bias, eps=float(eps), interpret=c.on_cpu(), pdl=PDL)
  return _add_layer_norm_triton(x, delta, scale, shift, bias, eps=float(eps), interpret=c.on_cpu(),
                                recycle=recycle)
