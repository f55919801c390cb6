"""Top-k selection without a sort: the indices of each row's k largest scores, with reference.

    top_k_indices(scores, k) == top_k_indices_reference(scores, k)
        = sort(lax.top_k(order_key(scores), k)[1])      # [B, k] int32, ascending

Why: at batch 1 the MLP's neuron set is the top k of F predictor scores (F = 20 480 at
OPT-13B, k = 2 048 at 10%). XLA runs `lax.top_k` as a full sort, one kernel of about 32 us
on an H100 per layer, 1.3 ms of an 8 ms sparse decode step at OPT-13B (docs/performance.md).
A selection needs no order among the chosen, so the kernel finds the k-th largest key by
bisection on its bits and then compacts, one program per row:

1. keys: each score's float bits mapped to an int32 that orders as the floats do
   (`order_key`; -0.0 sorts below +0.0, NaN above everything);
2. the k-th largest key T, bit by bit from the top: 32 counts of ``key >= candidate``;
3. every key > T, plus the first (lowest-index) keys == T until there are k;
4. their positions by a prefix sum, and one scatter store of their indices.

The indices come out ascending (row order), which also walks the weights in address order.
Ties at the k-th key go to the lower index, as in `lax.top_k`, so the set equals the
reference exactly, ties included.

Backends (`impl`): "triton" (Pallas lowered through Triton; one program per row, the whole
row in registers), "xla" (the reference: `lax.top_k` on the keys, then a sort of k indices),
"auto" (what `pallas_kernels.dispatch` names for "top_k_select": XLA everywhere for now, since
on the H100 the kernel measured slower than the sort, see NOTES.md). On the CPU the Triton
kernel runs in interpret mode. Not written for Mosaic GPU: its Pallas lowering has no prefix sum or scatter
store, which step 4 needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import _common as c

INT_MIN = -(2**31)
MAX_ROW = 1 << 16  # the whole row sits in registers: up to 65 536 scores (OPT-175B: 49 152)


def order_key(scores: jax.Array) -> jax.Array:
  """int32 keys ordered as the float32 scores: a < b (as floats) => key(a) < key(b)."""
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.int32)
  return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def top_k_indices_reference(scores: jax.Array, k: int) -> jax.Array:
  """[B, n] scores -> [B, k] int32: each row's k largest (ties: lower index), ascending."""
  return jnp.sort(jax.lax.top_k(order_key(scores), k)[1], axis=-1).astype(jnp.int32)


def _kernel(s_ref, o_ref, *, n, npad, k):
  row = pl.program_id(0)
  i = jnp.arange(npad, dtype=jnp.int32)
  valid = i < n
  s = pltr.load(s_ref.at[row, jnp.where(valid, i, 0)], mask=valid, other=0.0)
  key = order_key(s)

  def bit(b, prefix):
    # prefix holds the answer's top bits in unsigned order; compare in signed order (^ INT_MIN)
    cand = prefix | jnp.left_shift(jnp.int32(1), 31 - b)
    count = jnp.sum((valid & (key >= (cand ^ jnp.int32(INT_MIN)))).astype(jnp.int32))
    return jnp.where(count >= k, cand, prefix)

  t = jax.lax.fori_loop(0, 32, bit, jnp.int32(0)) ^ jnp.int32(INT_MIN)  # the k-th largest key
  greater = valid & (key > t)
  equal = valid & (key == t)
  need = k - jnp.sum(greater.astype(jnp.int32))
  take = greater | (equal & (jnp.cumsum(equal.astype(jnp.int32)) <= need))
  # a permutation of [0, npad): the k taken lanes first, in row order, then the rest. Every
  # lane stores to its own slot, so no store needs a mask (in interpret mode masked-off
  # lanes would rewrite a slot they share with a taken lane).
  taken = jnp.cumsum(take.astype(jnp.int32))
  pos = jnp.where(take, taken - 1, k + i - taken)
  pltr.store(o_ref.at[row, pos], i)


@functools.partial(jax.jit, static_argnames=("k", "num_warps", "interpret"))
def _top_k_triton(scores, *, k: int, num_warps: int, interpret: bool):
  b, n = scores.shape
  npad = c.next_pow2(n)
  kernel = functools.partial(_kernel, n=n, npad=npad, k=k)
  order = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, npad), jnp.int32), grid=(b,),
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="dejavu_top_k_select",
  )(scores.astype(jnp.float32))
  return order[:, :k]


def _auto_warps(n: int) -> int:
  """About 64 scores per thread, 4 to 32 warps."""
  return max(4, min(32, c.next_pow2(n) // (64 * 32)))


def _resolve(k, n: int, impl: str, op: str, batch: int) -> str:
  """Check k (an int in [1, n]) and impl; "auto" -> what `pallas_kernels.dispatch` names for op."""
  if not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the row length), got {k!r}.")
  return c.resolve_impl(impl, op, batch, ("auto", "triton", "xla"))


def top_k_indices(scores: jax.Array, k: int, *, impl: str = "auto", num_warps: int | None = None) -> jax.Array:
  """Indices of each row's ``k`` largest ``scores`` ([B, n] float) -> [B, k] int32, ascending;
  equal to `top_k_indices_reference` (see the module docstring)."""
  c.check_array("scores", scores, ndim=2, dtypes=c.FLOAT_DTYPES)
  n = scores.shape[1]
  impl = _resolve(k, n, impl, "top_k_select", scores.shape[0])
  if impl == "xla" or n > MAX_ROW:
    return top_k_indices_reference(scores, k)
  return _top_k_triton(scores, k=k, num_warps=num_warps or _auto_warps(n), interpret=c.on_cpu())


# ----------------------------------------------------------------------------- threshold sets
# Batch 1 with a threshold needs no ranking: the set is every score above the threshold, in
# index order. XLA lowers `jnp.nonzero(size=k)` to a prefix sum over four reduce-window
# kernels plus a scatter (5 launches, ~12 us per layer at F = 20 480 on an H100); one Triton
# program with the row in registers does the compare, the prefix sum and the store at once.


def threshold_compact_reference(scores: jax.Array, threshold, k: int) -> tuple[jax.Array, jax.Array]:
  """scores [n] -> (idx [k] int32: the indices i with scores[i] > threshold, ascending, the
  first k of them if more pass, zeros after; count: int32 scalar, how many of idx are real)."""
  above = scores > jnp.asarray(threshold, scores.dtype)
  idx = jnp.nonzero(above, size=k, fill_value=0)[0].astype(jnp.int32)
  return idx, jnp.minimum(jnp.sum(above, dtype=jnp.int32), k)


def _compact_kernel(s_ref, t_ref, idx_ref, count_ref, *, n, npad, k):
  i = jnp.arange(npad, dtype=jnp.int32)
  valid = i < n
  s = pltr.load(s_ref.at[jnp.where(valid, i, 0)], mask=valid, other=0.0)
  take = valid & (s > t_ref[0])
  taken = jnp.cumsum(take.astype(jnp.int32))
  total = jnp.sum(take.astype(jnp.int32))
  # a permutation of [0, npad): taken lanes first in index order (value: the index), then the
  # others (value 0, the fill); only slots < k exist, and no two lanes share a slot.
  pos = jnp.where(take, taken - 1, total + i - taken)
  pltr.store(idx_ref.at[pos], jnp.where(take, i, 0), mask=pos < k)
  count_ref[0] = jnp.minimum(total, k)


def _compact_warps(n: int) -> int:
  """8 warps up to 32 768 scores (about 128 a thread), more above: on an H100 at F = 20 480,
  4 warps spilled (219 us), 8 took 14.1 us, 16 17.4 us, 32 27.4 us (layer_kernels.json)."""
  return max(8, min(32, c.next_pow2(n) // (128 * 32)))


@functools.partial(jax.jit, static_argnames=("k", "num_warps", "interpret"))
def _compact_triton(scores, threshold, *, k: int, num_warps: int, interpret: bool):
  n = scores.shape[0]
  kernel = functools.partial(_compact_kernel, n=n, npad=c.next_pow2(n), k=k)
  idx, count = pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((k,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)),
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="dejavu_threshold_compact",
  )(scores, jnp.asarray(threshold, scores.dtype).reshape(1))
  return idx, count[0]


def threshold_compact(scores: jax.Array, threshold, k: int, *, impl: str = "auto",
                      num_warps: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The batch-1 threshold set: (idx [k] int32, count int32 scalar), equal to
  `threshold_compact_reference`. scores: [n] float (f32 or bf16); threshold: a float or a
  scalar array (compared in the scores' dtype); k: static, 1 <= k <= n. impl: "triton"
  (one Pallas Triton program), "xla" (the reference), "auto" (what `pallas_kernels.dispatch`
  names for "threshold_compact": XLA, which measured as fast on the H100). Rows longer than
  `MAX_ROW` take the reference."""
  c.check_array("scores", scores, ndim=1, dtypes=c.FLOAT_DTYPES)
  n = scores.shape[0]
  impl = _resolve(k, n, impl, "threshold_compact", 1)
  if impl == "xla" or n > MAX_ROW:
    return threshold_compact_reference(scores, threshold, k)
  return _compact_triton(scores, threshold, k=k, num_warps=num_warps or _compact_warps(n),
                         interpret=c.on_cpu())
