"""Gathered sparse MLP for contextual sparsity (Deja Vu), with references.

    sparse_mlp(x, w1, b1, w2t, b2, idx) = relu(x @ w1[idx].T + b1[idx]) @ w2t[idx] + b2

Shapes and dtypes:
  x: [B, d] (B from 1 to 64; bf16 or f32), output [B, d] in x.dtype.
  w1, w2t: [d_ff, d] (bf16, f16 or f32); row i is neuron i: fc1's weight in HF layout and
    fc2's weight transposed, so a neuron's fc1 and fc2 weights are each one contiguous row.
  b1: [d_ff] or None, b2: [d] or None.
  idx: [k] int32, the selected neurons (for B > 1 the union over the batch).
  count: None (all k valid) or an int32 scalar (traced is fine): entries at positions
    >= count are ignored and their rows are never read. k stays static under jit.
  mask (sparse_mlp_masked): [B, k], per-row subsets of the union; 0 drops the neuron.

Contract under jit: the first `count` entries of idx are unique and in [0, d_ff). With
concrete values, `checked=True` (the default) validates them at the Python boundary.

Backends (`impl`): "triton" (Pallas lowered through Triton), "mosaic" (Pallas Mosaic GPU,
batch 1), "xla" (jnp.take + dot, the portable fallback), "reference" (plain jnp in f32),
"auto" (see dispatch.backend_for). On the CPU, Pallas backends run in interpret mode.
Accumulation is f32; on the batched Pallas path the hidden activations are rounded to the
weight dtype before fc2 (as a dense bf16 MLP would).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import _common as c
from pallas_kernels import _triton_gemv as tg


@dataclasses.dataclass(frozen=True)
class SparseMLPTuning:
  """Tuning of the Pallas sparse MLP.

  variant: "fused" (fc1 -> ReLU -> fc2 in one kernel per neuron block, partial outputs
    summed afterwards) or "split" (fc1 kernel over d-splits, a tiny XLA ReLU, fc2 kernel
    over column tiles; fewer partial outputs, used for batches).
  block_k: neurons per tile (power of 2; 0 = from the shape). block_d: columns per tile.
  reduce: "sum" (partials written, then summed) or "atomic" (f32 atomics into the output).
  fc1_splits / fc2_splits: programs along d for fc1 / along neurons for fc2 (0 = auto).
  num_warps, num_stages: Triton launch parameters.
  """
  variant: str = "fused"
  block_k: int = 0
  block_d: int = 512
  reduce: str = "sum"
  fc1_splits: int = 0
  fc2_splits: int = 0
  num_warps: int = 4
  num_stages: int = 1


# ----------------------------------------------------------------------------- checks


def _check_mlp_args(x, w1, b1, w2t, b2, idx, mask=None):
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES)
  b, d = x.shape
  if not 1 <= b <= 64:
    raise ValueError(f"x has batch {b}; the kernels take 1 to 64 rows. Split the batch.")
  c.check_array("w1", w1, ndim=2, dtypes=c.FLOAT_DTYPES)
  d_ff = w1.shape[0]
  c.check_array("w1", w1, shape=(d_ff, d),
                hint="w1 is fc1's weight in HF layout [d_ff, d_model].")
  c.check_array("w2t", w2t, shape=(d_ff, d), dtypes=(w1.dtype,),
                hint="w2t is fc2's weight transposed, [d_ff, d_model], same dtype as w1.")
  if b1 is not None:
    c.check_array("b1", b1, shape=(d_ff,), dtypes=c.FLOAT_DTYPES)
  if b2 is not None:
    c.check_array("b2", b2, shape=(d,), dtypes=c.FLOAT_DTYPES)
  c.check_index_dtype("idx", idx)
  if mask is not None:
    c.check_array("mask", mask, shape=(b, idx.shape[0]),
                  hint="mask is [batch, k]: row r keeps neuron idx[j] where mask[r, j] != 0.")
  return b, d, d_ff


def _maybe_validate(checked, idx, n, count, what="neurons"):
  if checked and c.is_concrete(idx) and c.is_concrete(count):
    c.validate_indices(idx, n, count, what=what)


def _valid(k, count):
  return jnp.arange(k) < c.count_array(count, k)[0]


# ----------------------------------------------------------------------------- references


def sparse_mlp_reference(x, w1, b1, w2t, b2, idx, *, count=None, out_dtype=None, acc=None):
  """Plain jnp in f32: relu(x @ w1[idx].T + b1[idx]) @ w2t[idx] + b2 -> [B, d] x.dtype;
  with ``acc`` (f32 [B, d] or [G, B, d]): acc + that sum (into copy 0), in f32."""
  return sparse_mlp_masked_reference(x, w1, b1, w2t, b2, idx, None, count=count, out_dtype=out_dtype, acc=acc)


def sparse_mlp_masked_reference(x, w1, b1, w2t, b2, idx, mask, *, count=None, out_dtype=None, acc=None):
  """As sparse_mlp_reference with h[r, j] *= mask[r, j] ([B, k])."""
  h = sparse_fc1_reference(x, w1, b1, idx, count=count, _f32=True)
  if mask is not None:
    h = h * mask.astype(jnp.float32)
  if acc is not None:  # [B, d], or [G, B, d] copies: into copy 0
    return c.add_to_first(acc, sparse_fc2_reference(h, w2t, b2, idx, count=count, _out_dtype=jnp.float32))
  return sparse_fc2_reference(h, w2t, b2, idx, count=count, _out_dtype=out_dtype or x.dtype)


def sparse_fc1_reference(x, w1, b1, idx, *, count=None, _f32=False):
  """relu(x @ w1[idx].T + b1[idx]) -> [B, k] (zero at positions >= count), x.dtype."""
  f32 = jnp.float32
  rows = jnp.clip(idx, 0, w1.shape[0] - 1)
  pre = x.astype(f32) @ w1[rows].astype(f32).T
  if b1 is not None:
    pre = pre + b1[rows].astype(f32)
  h = jnp.where(_valid(idx.shape[0], count), jnp.maximum(pre, 0.0), 0.0)
  return h if _f32 else h.astype(x.dtype)


def sparse_fc2_reference(h, w2t, b2, idx, *, count=None, _out_dtype=None):
  """h @ w2t[idx] + b2 -> [B, d]; positions >= count contribute nothing."""
  f32 = jnp.float32
  rows = jnp.clip(idx, 0, w2t.shape[0] - 1)
  hv = jnp.where(_valid(idx.shape[0], count), h.astype(f32), 0.0)
  out = hv @ w2t[rows].astype(f32)
  if b2 is not None:
    out = out + b2.astype(f32)
  return out.astype(_out_dtype or h.dtype)


# ----------------------------------------------------------------------------- XLA path


def _xla_fc1(x, w1, b1, idx, count):
  w = jnp.take(w1, idx, axis=0, mode="clip")
  pre = jnp.einsum("bd,kd->bk", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
  if b1 is not None:
    pre = pre + jnp.take(b1, idx, mode="clip").astype(jnp.float32)
  return jnp.where(_valid(idx.shape[0], count), jnp.maximum(pre, 0.0), 0.0)


def _xla_fc2(h, w2t, b2, idx, count, out_dtype):
  w = jnp.take(w2t, idx, axis=0, mode="clip")
  h = jnp.where(_valid(idx.shape[0], count), h, 0).astype(w.dtype)
  out = jnp.einsum("bk,kd->bd", h, w, preferred_element_type=jnp.float32)
  if b2 is not None:
    out = out + b2.astype(jnp.float32)
  return out.astype(out_dtype)


# ----------------------------------------------------------------------------- Pallas path


def _plan(tuning: SparseMLPTuning | None, batch: int, k: int, d: int) -> SparseMLPTuning:
  # Defaults from the H100 exploration (NOTES.md): batch 1 fused k<=16 x 1024 columns;
  # batched: split with 64-neuron tiles x 256 columns and 8 warps (splits fill the GPU).
  t = tuning or (SparseMLPTuning("fused", block_d=1024, num_warps=8) if batch == 1 else
                 SparseMLPTuning("split", block_k=64, block_d=256, num_warps=8))
  block_k = t.block_k or tg.auto_block_k(k, batch, c.num_sms())
  if batch > 1:
    block_k = max(block_k, 16)
  block_d = min(t.block_d, c.next_pow2(d))
  return dataclasses.replace(t, block_k=block_k, block_d=block_d)


def _gemv_tuning(t: SparseMLPTuning, splits: int) -> tg.GemvTuning:
  return tg.GemvTuning(block_k=t.block_k, block_d=t.block_d, splits=splits,
                       num_warps=t.num_warps, num_stages=t.num_stages)


def fc1_splits(t: SparseMLPTuning, k: int, d: int) -> int:
  """d-splits of fc1 so that (neuron blocks x splits) reaches ~2 programs per SM."""
  if t.fc1_splits:
    return t.fc1_splits
  want = c.cdiv(2 * c.num_sms(), c.cdiv(k, t.block_k))
  return max(1, min(c.cdiv(d, t.block_d), want))


def fc2_splits(t: SparseMLPTuning, k: int, d: int) -> int:
  """Neuron splits of fc2 so that (splits x column tiles) reaches ~2 programs per SM."""
  if t.fc2_splits:
    return t.fc2_splits
  want = c.cdiv(2 * c.num_sms(), c.cdiv(d, t.block_d))
  return max(1, min(c.cdiv(k, t.block_k), want))


def _finish(out_f32, b2, dtype):
  if b2 is not None:
    out_f32 = out_f32 + b2.astype(jnp.float32)
  return out_f32.astype(dtype)


def _pallas_mlp(x, w1, b1, w2t, b2, idx, mask, count, t: SparseMLPTuning, interpret, out_dtype, unsummed=False):
  """Fused: 1 kernel + 1 XLA reduction. Split: 2 kernels + 1 XLA reduction."""
  k, d = idx.shape[0], x.shape[1]
  cnt = c.count_array(count, k) if count is not None else jnp.full((1,), k, jnp.int32)
  if t.variant == "fused":
    part = tg.fused_mlp_partials(x, w1, b1, w2t, idx, cnt, mask, tuning=_gemv_tuning(t, 1),
                                 interpret=interpret)
  elif t.variant == "split":
    pre = tg.gather_matvec(x, w1, idx, cnt, k=k, tuning=_gemv_tuning(t, fc1_splits(t, k, d)),
                           interpret=interpret)
    part = tg.gather_matvec_t(pre, w2t, idx, cnt, b1, mask, k=k,
                              tuning=_gemv_tuning(t, fc2_splits(t, k, d)), interpret=interpret)
  else:
    raise ValueError(f"Unknown SparseMLPTuning.variant {t.variant!r}: use 'fused' or 'split'.")
  return part if unsummed else _finish(part.sum(0), b2, out_dtype)


# ----------------------------------------------------------------------------- public API


def _resolve(impl, op, batch):
  impl = c.resolve_impl(impl, op, batch)
  if impl == "mosaic" and batch != 1:
    impl = "triton"  # the Mosaic GPU kernel covers batch 1 only
  return impl, c.on_cpu()


def sparse_mlp(x, w1, b1, w2t, b2, idx, *, count=None, impl="auto",
               tuning: SparseMLPTuning | None = None, checked: bool = True, out_dtype=None, acc=None,
               unsummed: bool = False):
  """relu(x @ w1[idx].T + b1[idx]) @ w2t[idx] + b2 -> [B, d] in x.dtype (see module doc).
  ``out_dtype`` (default x.dtype): e.g. float32 with b2=None gives the unrounded sum, for a
  caller that adds b2 itself (`pallas_kernels.layer_norm.add_layer_norm`). ``acc`` (f32
  [B, d], or [G, B, d]: G copies whose sum is meant): the result is acc with that f32 sum
  added, in f32 (out_dtype must be None or float32); on the Mosaic kernel (batch 1) the sum
  is added into acc's buffer in-kernel, with f32 atomics, CTA g into copy g % G, so no
  partials are written and no summing kernel runs (`_mosaic_mlp._accumulate`); elsewhere
  (and in the reference) into copy 0. ``unsummed`` (b2 None, no acc): f32 [S, B, d] partials
  whose sum is the f32 result, as the Pallas kernels write them (one on the XLA and reference
  paths), for `pallas_kernels.layer_norm.add_layer_norm(arrivals=)` to sum."""
  return sparse_mlp_masked(x, w1, b1, w2t, b2, idx, None, count=count, impl=impl,
                           tuning=tuning, checked=checked, out_dtype=out_dtype, acc=acc, unsummed=unsummed)


def sparse_mlp_masked(x, w1, b1, w2t, b2, idx, mask, *, count=None, impl="auto",
                      tuning: SparseMLPTuning | None = None, checked: bool = True, out_dtype=None, acc=None,
                      unsummed: bool = False):
  """sparse_mlp with per-row subsets: h[r, j] *= mask[r, j], mask: [B, k] (bool or float)."""
  b, d, d_ff = _check_mlp_args(x, w1, b1, w2t, b2, idx, mask)
  _maybe_validate(checked, idx, d_ff, count)
  impl, interpret = _resolve(impl, "sparse_mlp", b)
  k = idx.shape[0]
  if unsummed:
    c.check_unsummed("b2", b2, acc, out_dtype)
    if impl in ("reference", "xla") or k == 0:
      return sparse_mlp_masked(x, w1, b1, w2t, None, idx, mask, count=count, impl=impl, checked=False,
                               out_dtype=jnp.float32)[None]
    if impl == "mosaic":
      from pallas_kernels import _mosaic_mlp
      mt = tuning if isinstance(tuning, _mosaic_mlp.MosaicMLPTuning) else None
      if _mosaic_mlp.supported(x, w1, mask):
        return _mosaic_mlp.partials(x, w1, b1, w2t, idx, count, interpret=interpret, tuning=mt)[:, None]
      tuning = None  # the Triton kernels, as sparse_mlp_mosaic falls back
    t = _plan(tuning if isinstance(tuning, SparseMLPTuning) else None, b, k, d)
    return _pallas_mlp(x, w1, b1, w2t, None, idx, mask, count, t, interpret, jnp.float32, unsummed=True)
  if acc is not None:
    c.check_acc(acc, (b, d) if getattr(acc, "ndim", 2) == 2 else (None, b, d), out_dtype)
    if impl == "mosaic":
      from pallas_kernels import _mosaic_mlp
      mt = tuning if isinstance(tuning, _mosaic_mlp.MosaicMLPTuning) else None
      return _mosaic_mlp.sparse_mlp_mosaic(x, w1, b1, w2t, b2, idx, mask, count, interpret=interpret,
                                           tuning=mt, acc=acc)
    return c.add_to_first(acc, sparse_mlp_masked(x, w1, b1, w2t, b2, idx, mask, count=count, impl=impl,
                                                 tuning=tuning, checked=False, out_dtype=jnp.float32))
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if impl == "reference":
    return sparse_mlp_masked_reference(x, w1, b1, w2t, b2, idx, mask, count=count, out_dtype=out_dtype)
  if k == 0 or impl == "xla":
    h = _xla_fc1(x, w1, b1, idx, count)
    if mask is not None:
      h = h * mask.astype(jnp.float32)
    return _xla_fc2(h, w2t, b2, idx, count, out_dtype)
  if impl == "mosaic":
    from pallas_kernels import _mosaic_mlp
    mt = tuning if isinstance(tuning, _mosaic_mlp.MosaicMLPTuning) else None
    return _mosaic_mlp.sparse_mlp_mosaic(x, w1, b1, w2t, b2, idx, mask, count,
                                         interpret=interpret, tuning=mt, out_dtype=out_dtype)
  if not isinstance(tuning, (SparseMLPTuning, type(None))):
    tuning = None
  t = _plan(tuning, b, k, d)
  return _pallas_mlp(x, w1, b1, w2t, b2, idx, mask, count, t, interpret, out_dtype)


def sparse_fc1(x, w1, b1, idx, *, count=None, impl="auto",
               tuning: SparseMLPTuning | None = None, checked: bool = True):
  """relu(x @ w1[idx].T + b1[idx]) -> [B, k] in x.dtype; zero at positions >= count."""
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES)
  c.check_array("w1", w1, shape=(None, x.shape[1]), dtypes=c.FLOAT_DTYPES,
                hint="w1 is [d_ff, d_model].")
  if b1 is not None:
    c.check_array("b1", b1, shape=(w1.shape[0],), dtypes=c.FLOAT_DTYPES)
  c.check_index_dtype("idx", idx)
  _maybe_validate(checked, idx, w1.shape[0], count)
  impl, interpret = _resolve(impl, "sparse_fc1", x.shape[0])
  k = idx.shape[0]
  if impl == "reference":
    return sparse_fc1_reference(x, w1, b1, idx, count=count)
  if k == 0 or impl in ("xla", "mosaic"):
    return _xla_fc1(x, w1, b1, idx, count).astype(x.dtype)
  if not isinstance(tuning, (SparseMLPTuning, type(None))):
    tuning = None
  t = _plan(tuning, x.shape[0], k, x.shape[1])
  cnt = c.count_array(count, k)
  splits = fc1_splits(t, k, x.shape[1])
  if splits == 1:  # one program per neuron block: bias, ReLU and cast in-kernel
    return tg.gather_matvec(x, w1, idx, cnt, b1, k=k, tuning=_gemv_tuning(t, 1),
                            epilogue="bias_relu" if b1 is not None else "none",
                            interpret=interpret).astype(x.dtype)
  pre = tg.gather_matvec(x, w1, idx, cnt, k=k, tuning=_gemv_tuning(t, splits),
                         interpret=interpret).sum(0)
  if b1 is not None:
    pre = pre + jnp.take(b1, idx, mode="clip").astype(jnp.float32)
  return jnp.where(_valid(k, count), jnp.maximum(pre, 0.0), 0.0).astype(x.dtype)


def sparse_fc2(h, w2t, b2, idx, *, count=None, impl="auto",
               tuning: SparseMLPTuning | None = None, checked: bool = True):
  """h @ w2t[idx] + b2 -> [B, d] in h.dtype; h: [B, k]; positions >= count ignored."""
  c.check_array("h", h, ndim=2, dtypes=c.FLOAT_DTYPES)
  c.check_array("w2t", w2t, ndim=2, dtypes=c.FLOAT_DTYPES, hint="w2t is [d_ff, d_model].")
  c.check_index_dtype("idx", idx)
  c.check_array("h", h, shape=(None, idx.shape[0]), hint="h is [batch, k] with k = len(idx).")
  if b2 is not None:
    c.check_array("b2", b2, shape=(w2t.shape[1],), dtypes=c.FLOAT_DTYPES)
  _maybe_validate(checked, idx, w2t.shape[0], count)
  impl, interpret = _resolve(impl, "sparse_fc2", h.shape[0])
  k = idx.shape[0]
  if impl == "reference":
    return sparse_fc2_reference(h, w2t, b2, idx, count=count)
  if k == 0 or impl in ("xla", "mosaic"):
    return _xla_fc2(h, w2t, b2, idx, count, h.dtype)
  if not isinstance(tuning, (SparseMLPTuning, type(None))):
    tuning = None
  t = _plan(tuning, h.shape[0], k, w2t.shape[1])
  part = tg.gather_matvec_t(h, w2t, idx, c.count_array(count, k), k=k,
                            tuning=_gemv_tuning(t, fc2_splits(t, k, w2t.shape[1])),
                            interpret=interpret)
  return _finish(part.sum(0), b2, h.dtype)


sparse_mlp_jit = jax.jit(sparse_mlp, static_argnames=("impl", "tuning", "checked"))
