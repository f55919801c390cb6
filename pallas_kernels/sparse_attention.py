"""Head-sparse attention kernels: QKV and output projections of selected heads, and (from
`pallas_kernels.decode_attention`, re-exported) decode attention that reads only the
selected heads' KV cache. With references.

Weight layout (per head, row-major, so one head's slice is contiguous):
  wqkv: [3, H, hd, d] (q, k, v projections; HF weight rows grouped by head),
  bqkv: [3, H, hd] or None, wo_t: [H, hd, d] (out_proj weight transposed per head),
  bo: [d] or None. heads: [k_h] int32, unique, in [0, H).

  head_sparse_qkv(x [B, d], ...)            -> [len(which), B, k_h, hd] in x.dtype
  head_sparse_out(o [B, k_h, hd], ...)      -> [B, d] in o.dtype
  head_sparse_decode_attention(q [B, k_h, hd] (already scaled), k_cache, v_cache
      [B, H, S, hd], heads, kv_mask [B, S] bool) -> [B, k_h, hd] in q.dtype
Softmax in f32; a row with no valid cached position gives zeros.
The projections run the gathered GEMV kernels of `_triton_gemv` on the weight viewed as
rows [3*H*hd, d] / [H*hd, d]; the attention kernel splits the sequence across programs
(flash-decoding) and the partial (max, sum, output) triples are combined in XLA or in the
out-projection's tiles.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common as c
from pallas_kernels import _triton_gemv as tg
from pallas_kernels import _triton_q_kv as tq
from pallas_kernels.decode_attention import (AttentionPartials, DecodeAttentionTuning,  # noqa: F401 - re-exported
                                             _check_heads, _decode_attention_triton, _decode_attention_xla, _resolve,
                                             _valid, head_sparse_decode_attention,
                                             head_sparse_decode_attention_reference)
from pallas_kernels.hosted_sets import (ScoresJob, SideGemv, TileSets, check_side, scatter_sets_reference,
                                        scores_job_reference, side_gemv_reference)

OUT_PROGRAMS_PER_SM = 2  # the out-projection's automatic splits of its rows: about this many programs an SM


@dataclasses.dataclass(frozen=True)
class HeadProjTuning:
  """Tuning of the head-sparse projections (gathered GEMV over the heads' rows).
  block_k rows per tile, block_d columns per tile, splits, num_warps: 0 = from the shape
  (batch 1: q/k/v 4 x 512 with 4 warps, out 8 x 1024 with 8 warps; batched: block_k 64,
  block_d 256, 8 warps)."""
  block_k: int = 0
  block_d: int = 0
  splits: int = 0
  num_warps: int = 0
  num_stages: int = 1


# ----------------------------------------------------------------------------- references


def head_sparse_qkv_reference(x, wqkv, bqkv, heads, *, which=(0, 1, 2)):
  """[len(which), B, k_h, hd]: x @ wqkv[t, heads].T (+ bqkv[t, heads]) in f32."""
  w = wqkv[jnp.asarray(which)][:, heads].astype(jnp.float32)  # [t, k_h, hd, d]
  out = jnp.einsum("bd,thed->tbhe", x.astype(jnp.float32), w)
  if bqkv is not None:
    out = out + bqkv[jnp.asarray(which)][:, heads].astype(jnp.float32)[:, None]
  return out.astype(x.dtype)


def head_sparse_out_reference(o, wo_t, bo, heads, *, out_dtype=None, acc=None):
  """[B, d]: sum over selected heads of o[:, i] @ wo_t[heads[i]] (+ bo), in f32, then in
  ``out_dtype`` (default o.dtype); with ``acc`` (f32 [B, d]): acc + that sum, in f32."""
  out = jnp.einsum("bhe,hed->bd", o.astype(jnp.float32), wo_t[heads].astype(jnp.float32))
  if bo is not None:
    out = out + bo.astype(jnp.float32)
  if acc is not None:
    return acc.astype(jnp.float32) + out
  return out.astype(out_dtype or o.dtype)


# ----------------------------------------------------------------------------- checks


def _proj_tuning(t: HeadProjTuning | None, batch, n_rows, d, op="qkv"):
  # Batch 1 on an H100 (scripts/profile_sparse_layer.py, layer_kernels.json; OPT-13B / 30B):
  # q/k/v rows in tiles of 4 x 512 (K/V of all heads 40.8 / 74.0 us a layer, as fast as XLA's
  # dense GEMV of those rows; 16-row tiles took 48.7 / 85.5: a short last wave of programs);
  # out-projection 8 x 1024 tiles with 8 warps (15.7 / 28.0 us against 17.8 / 35.1).
  t = t or HeadProjTuning()
  if batch > 1:
    bk, bd, nw = t.block_k or 64, t.block_d or 256, t.num_warps or 8
  elif op == "qkv":
    bk, bd, nw = t.block_k or 4, t.block_d or 512, t.num_warps or 4
  else:
    bk = t.block_k or min(8, tg.auto_block_k(n_rows, 1, c.num_sms()))
    bd, nw = t.block_d or 1024, t.num_warps or 8
  return tg.GemvTuning(block_k=bk, block_d=min(bd, c.next_pow2(d)), splits=t.splits,
                       num_warps=nw, num_stages=t.num_stages)


# ----------------------------------------------------------------------------- projections


def _check_qkv_args(x, wqkv, bqkv):
  """-> (n_heads, head_dim, d) after checking x [B, d], wqkv [3, H, hd, d], bqkv [3, H, hd]."""
  c.check_array("x", x, ndim=2, dtypes=c.FLOAT_DTYPES)
  c.check_array("wqkv", wqkv, ndim=4, dtypes=c.FLOAT_DTYPES,
                hint="wqkv is [3, n_heads, head_dim, d_model].")
  _, n_heads, hd, d = wqkv.shape
  c.check_array("wqkv", wqkv, shape=(3, n_heads, hd, x.shape[1]),
                hint="wqkv is [3, n_heads, head_dim, d_model] with d_model = x.shape[1].")
  if bqkv is not None:
    c.check_array("bqkv", bqkv, shape=(3, n_heads, hd), dtypes=c.FLOAT_DTYPES)
  return n_heads, hd, d


def head_sparse_qkv(x, wqkv, bqkv, heads, *, which=(0, 1, 2), impl="auto",
                    tuning: HeadProjTuning | None = None, checked: bool = True):
  """Projections of the selected heads only -> [len(which), B, k_h, hd] in x.dtype."""
  n_heads, hd, d = _check_qkv_args(x, wqkv, bqkv)
  which = tuple(int(t) for t in which)
  if not which or any(t not in (0, 1, 2) for t in which) or len(set(which)) != len(which):
    raise ValueError(f"which={which} must be distinct entries of (0, 1, 2) (q, k, v).")
  _check_heads(heads, n_heads, checked)
  impl, interpret = _resolve(impl, "head_sparse_qkv", x.shape[0])
  if impl == "reference":
    return head_sparse_qkv_reference(x, wqkv, bqkv, heads, which=which)
  b, k_h = x.shape[0], heads.shape[0]
  n_rows = len(which) * k_h * hd
  if impl == "xla" or k_h == 0:
    tw = jnp.asarray(which, jnp.int32)
    rows = ((tw[:, None, None] * n_heads + heads[None, :, None].astype(jnp.int32)) * hd
            + jnp.arange(hd, dtype=jnp.int32)[None, None, :]).reshape(-1)
    w = jnp.take(wqkv.reshape(3 * n_heads * hd, d), rows, axis=0, mode="clip")
    out = jnp.einsum("bd,rd->br", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if bqkv is not None:
      out = out + jnp.take(bqkv.reshape(-1), rows, mode="clip").astype(jnp.float32)
  else:
    t = _proj_tuning(tuning, b, n_rows, d)
    if not t.splits:  # split d only when the heads' rows alone cannot fill the GPU
      want = c.cdiv(2 * c.num_sms(), c.cdiv(n_rows, t.block_k))
      t = dataclasses.replace(t, splits=max(1, min(c.cdiv(d, t.block_d), want)))
    rowmap = ("qkv", which, n_heads, hd, k_h)
    args = (x, wqkv.reshape(3 * n_heads * hd, d), heads, jnp.full((1,), n_rows, jnp.int32))
    bias = None if bqkv is None else bqkv.reshape(-1)
    if t.splits == 1:  # bias and cast in-kernel: one kernel in all
      out = tg.gather_matvec(*args, bias, k=n_rows, tuning=t, rowmap=rowmap,
                             epilogue="none" if bias is None else "bias", interpret=interpret)
    else:
      out = tg.gather_matvec(*args, k=n_rows, tuning=t, rowmap=rowmap,
                             interpret=interpret).sum(0)
      if bias is not None:
        out = out + _qkv_bias(bqkv, heads, which).astype(jnp.float32)
  out = out.reshape(b, len(which), k_h, hd).transpose(1, 0, 2, 3)
  return out.astype(x.dtype)


def head_sparse_q_kv_update_reference(x, wqkv, bqkv, heads, k_cache, v_cache, slot, *, q_scale=1.0,
                                      kv_heads="all", head_valid=None, side=None, scatter=None):
  """(q [B, k_h, hd]: the selected heads' q times q_scale, rounded once to x.dtype; k_cache,
  v_cache with the K/V of x of every head (kv_heads "all") or of the selected heads
  ("selected") written at position ``slot``[; head_valid with the selected heads' entries at
  ``slot`` set, when given][; the `SideGemv`'s f32 [1, n], when given][; idx, count: the
  `TileSets` scattered, when given])."""
  q32 = head_sparse_qkv_reference(x.astype(jnp.float32), wqkv, bqkv, heads, which=(0,))[0]
  q = (q32 * q_scale).astype(x.dtype)  # the scale before the rounding, as the kernel applies it
  k_cache, v_cache = _write_kv(x, wqkv, bqkv, heads, k_cache, v_cache, slot, kv_heads, "reference")
  return (q, k_cache, v_cache) + _mark_valid(head_valid, heads, slot) + _extras(side, scatter)


def _extras(side, scatter) -> tuple:
  """The side GEMV's and the scatter's outputs, as XLA ops."""
  return (() if side is None else (side_gemv_reference(side),)) + (
      () if scatter is None else scatter_sets_reference(scatter))


def _mark_valid(head_valid, heads, slot) -> tuple:
  """() or (head_valid with [:, heads, slot] set to 1,)."""
  if head_valid is None:
    return ()
  slot = jnp.asarray(slot).reshape(()).astype(jnp.int32)
  return (head_valid.at[:, heads, slot].set(jnp.ones((), head_valid.dtype)),)


def _write_kv(x, wqkv, bqkv, heads, k_cache, v_cache, slot, kv_heads, impl):
  """The caches with K/V of x at ``slot`` for every head ("all") or the selected ones."""
  n_heads = wqkv.shape[1]
  kv_of = jnp.arange(n_heads, dtype=jnp.int32) if kv_heads == "all" else heads
  # every head through the gather path, not an einsum over wqkv[1:] (XLA would copy that slice)
  kv = (head_sparse_qkv_reference(x, wqkv, bqkv, kv_of, which=(1, 2)) if impl == "reference" else
        head_sparse_qkv(x, wqkv, bqkv, kv_of, which=(1, 2), impl=impl, checked=False))
  slot = jnp.asarray(slot).reshape(()).astype(jnp.int32)
  if kv_heads == "all":
    at = (0, 0, slot, 0)
    return (lax.dynamic_update_slice(k_cache, kv[0][:, :, None].astype(k_cache.dtype), at),
            lax.dynamic_update_slice(v_cache, kv[1][:, :, None].astype(v_cache.dtype), at))
  rows = jnp.arange(x.shape[0])[:, None]
  return (k_cache.at[rows, heads[None], slot].set(kv[0].astype(k_cache.dtype)),
          v_cache.at[rows, heads[None], slot].set(kv[1].astype(v_cache.dtype)))


def head_sparse_q_kv_update(x, wqkv, bqkv, heads, k_cache, v_cache, slot, *, q_scale: float = 1.0,
                            kv_heads: str = "all", head_valid=None, side: SideGemv | None = None,
                            scatter: TileSets | None = None, impl="auto",
                            tuning: HeadProjTuning | None = None, checked: bool = True):
  """A decode step's projections: q of the selected heads (times ``q_scale``, e.g.
  head_dim ** -0.5, before the rounding) and the K and V of every head (``kv_heads="all"``,
  kv_policy "all") or of the selected heads only ("selected") written into the caches
  [B, H, S, hd] at position ``slot`` (an int32 scalar). Returns (q [B, k_h, hd] in x.dtype,
  k_cache, v_cache). With kv_heads "selected", ``head_valid`` [B, H, S] (bool or integer)
  may be given: every row's entries of the selected heads at ``slot`` are set to 1 and it is
  returned next (kv_policy "selected": the slots that hold K/V). With ``side`` (a `SideGemv`),
  its f32 [1, n] is returned next; with ``scatter`` (an MLP set before its scatter,
  `pallas_kernels.predict_sets.TileSets`), its (idx [k], count) last. On Triton both run on
  extra programs of the same launch.

  Triton: one kernel for all of it (the caches updated in place, aliased to its outputs)
  instead of two projection kernels, a scaling and two cache updates; XLA: those ops."""
  if kv_heads not in ("all", "selected"):
    raise ValueError(f"kv_heads must be 'all' or 'selected', got {kv_heads!r}.")
  n_heads, hd, d = _check_qkv_args(x, wqkv, bqkv)
  if head_valid is not None:
    if kv_heads != "selected":
      raise ValueError("head_valid goes with kv_heads='selected' (with 'all' every head's slot is written).")
    c.check_array("head_valid", head_valid, shape=(x.shape[0], n_heads, k_cache.shape[2]),
                  dtypes=(jnp.bool_, jnp.int8, jnp.uint8, jnp.int32),
                  hint="head_valid is [batch, n_heads, seq]: nonzero where a head's cached slot is valid.")
  c.check_array("k_cache", k_cache, shape=(x.shape[0], n_heads, None, hd), dtypes=c.FLOAT_DTYPES,
                hint="k_cache is [batch, n_heads, seq, head_dim].")
  c.check_array("v_cache", v_cache, shape=k_cache.shape, dtypes=(k_cache.dtype,),
                hint="v_cache is k_cache's shape and dtype.")
  slot = jnp.asarray(slot)
  if slot.size != 1 or not jnp.issubdtype(slot.dtype, jnp.integer):
    raise ValueError(f"slot must be an integer scalar, got {slot.dtype} of shape {tuple(slot.shape)}.")
  if c.is_concrete(slot) and not 0 <= int(slot.reshape(())) < k_cache.shape[2]:
    raise ValueError(f"slot={int(slot.reshape(()))} is outside the cache's {k_cache.shape[2]} positions.")
  _check_heads(heads, n_heads, checked)
  if side is not None:
    check_side(side, d)
  if scatter is not None:
    c.check_array("scatter loc", scatter.loc, ndim=2, dtypes=(jnp.int32,), hint="loc is [n_tiles, tile] int32.")
    c.check_array("scatter cnt", scatter.cnt, shape=scatter.loc.shape[:1], dtypes=(jnp.int32,),
                  hint="cnt is [n_tiles] int32.")
  impl, interpret = _resolve(impl, "head_sparse_qkv", x.shape[0])
  if impl == "reference":
    return head_sparse_q_kv_update_reference(x, wqkv, bqkv, heads, k_cache, v_cache, slot, q_scale=q_scale,
                                             kv_heads=kv_heads, head_valid=head_valid, side=side,
                                             scatter=scatter)
  if impl == "xla" or heads.shape[0] == 0 or (x.shape[0] > 1 and hd % 16):
    # (batched rows take tensor-core dots over tiles of >= 16 rows, which must not straddle heads)
    return q_kv_update_ops(x, wqkv, bqkv, heads, k_cache, v_cache, slot, q_scale=q_scale, kv_heads=kv_heads,
                           head_valid=head_valid, side=side, scatter=scatter, impl="xla")
  t = _proj_tuning(tuning, x.shape[0], 3 * n_heads * hd, d)
  bk = t.block_k
  while hd % bk:
    bk //= 2
  t = dataclasses.replace(t, block_k=bk, splits=1)
  bias = None if bqkv is None else bqkv.reshape(-1)
  q, *rest = tq.gather_matvec_q_kv_cache(
      x, wqkv.reshape(3 * n_heads * hd, d), bias, heads.astype(jnp.int32), k_cache, v_cache,
      slot.reshape((1,)).astype(jnp.int32), head_valid, *((side.x, side.w) if side is not None else (None, None)),
      *((scatter.loc, scatter.cnt) if scatter is not None else ()), q_scale=float(q_scale), tuning=t,
      kv_selected=kv_heads == "selected", side=None if side is None else (side.offset, side.n, float(side.eps)),
      scatter_k=None if scatter is None else scatter.k, extra_first=tq.EXTRA_PROGRAMS_FIRST, interpret=interpret)
  if scatter is not None:
    rest[-1] = rest[-1][0]  # count as a scalar
  return (q.reshape(x.shape[0], heads.shape[0], hd), *rest)


def q_kv_update_ops(x, wqkv, bqkv, heads, k_cache, v_cache, slot, *, q_scale: float = 1.0, kv_heads="all",
                    head_valid=None, side=None, scatter=None, impl="auto", checked: bool = False):
  """`head_sparse_q_kv_update` as separate ops: `head_sparse_qkv` of the selected heads' q and
  of the K/V heads' K/V (the gathered-row kernels, or XLA gathers, per ``impl``), q scaled
  after its rounding, two cache updates, the side GEMV as XLA ops. Its XLA path, and the
  unfused decode step's."""
  q = head_sparse_qkv(x, wqkv, bqkv, heads, which=(0,), impl=impl, checked=checked)[0]
  q = q * jnp.asarray(q_scale, q.dtype) if q_scale != 1.0 else q
  return (q, *_write_kv(x, wqkv, bqkv, heads, k_cache, v_cache, slot, kv_heads, impl),
          *_mark_valid(head_valid, heads, slot), *_extras(side, scatter))


def _qkv_bias(bqkv, heads, which):
  return bqkv[jnp.asarray(which)][:, heads].reshape(-1)


def head_sparse_out(o, wo_t, bo, heads, *, impl="auto", tuning: HeadProjTuning | None = None,
                    checked: bool = True, out_dtype=None, scores: ScoresJob | None = None, acc=None,
                    unsummed: bool = False):
  """Output projection of the selected heads: sum_i o[:, i] @ wo_t[heads[i]] + bo -> [B, d]
  in ``out_dtype`` (default o.dtype; float32 with bo=None: the unrounded sum, for a caller
  that adds bo itself, e.g. `pallas_kernels.layer_norm.add_layer_norm`). ``acc`` (f32
  [B, d], not with ``scores``): acc + that f32 sum, in f32; on Triton each program adds its
  tile into acc's buffer with f32 atomics (no partials written, no summing kernel).
  o may be an `AttentionPartials` (`head_sparse_decode_attention(combine=False)`): the
  Triton kernel then combines it per tile, the other paths first. With ``scores`` (a
  `pallas_kernels.hosted_sets.ScoresJob`: the next layer's sets from its predictor hidden)
  returns (out, (heads, TileSets)); on Triton the job runs on extra programs of the launch.
  ``unsummed`` (bo None, no acc): f32 [S, B, d] partials whose sum is the f32 result, as the
  Triton kernel writes them (one on the other paths), for `add_layer_norm(arrivals=)` to sum."""
  parts = None
  if isinstance(o, AttentionPartials):
    c.check_array("o.o", o.o, ndim=4, dtypes=(jnp.float32,), hint="AttentionPartials.o is f32 [splits, B, k_h, hd].")
    for name in ("m", "l"):
      c.check_array(f"o.{name}", getattr(o, name), shape=o.o.shape[:3], dtypes=(jnp.float32,),
                    hint=f"AttentionPartials.{name} is f32 [splits, B, k_h], as head_sparse_decode_attention "
                    "(combine=False) returns it.")
    parts, o = o, jax.ShapeDtypeStruct(o.o.shape[1:], o.dtype)  # checked as the combined o
  c.check_array("o", o, ndim=3, dtypes=c.FLOAT_DTYPES, hint="o is [batch, k_heads, head_dim].")
  c.check_array("wo_t", wo_t, ndim=3, dtypes=c.FLOAT_DTYPES,
                hint="wo_t is out_proj's weight transposed per head, [n_heads, head_dim, d].")
  n_heads, hd, d = wo_t.shape
  c.check_array("o", o, shape=(None, heads.shape[0], hd),
                hint="o is [batch, len(heads), head_dim].")
  if bo is not None:
    c.check_array("bo", bo, shape=(d,), dtypes=c.FLOAT_DTYPES)
  _check_heads(heads, n_heads, checked)
  if unsummed:
    c.check_unsummed("bo", bo, acc, out_dtype)
  if acc is not None:
    c.check_acc(acc, (o.shape[0], d), out_dtype)
    if scores is not None:
      raise ValueError("a scores job runs with written partials, not with acc; drop one of them.")
  impl, interpret = _resolve(impl, "head_sparse_out", o.shape[0])
  out_dtype = jnp.dtype(out_dtype or o.dtype)
  b, k_h, _ = o.shape
  if parts is not None and (impl != "triton" or k_h == 0):
    o, parts = parts.combine(), None
  if acc is not None and (impl != "triton" or k_h == 0):
    return acc + head_sparse_out(o if parts is None else parts, wo_t, bo, heads, impl=impl, tuning=tuning,
                                 checked=False, out_dtype=jnp.float32)
  if impl == "reference":
    out = head_sparse_out_reference(o, wo_t, bo, heads, out_dtype=jnp.float32 if unsummed else out_dtype)
    out = out[None] if unsummed else out
    return out if scores is None else (out, scores_job_reference(scores))
  n_rows = k_h * hd
  w_rows = wo_t.reshape(n_heads * hd, d)
  if parts is None:
    h = o.reshape(b, n_rows)
  sets = None
  if impl == "xla" or k_h == 0:
    rows = (heads[:, None].astype(jnp.int32) * hd + jnp.arange(hd, dtype=jnp.int32)).reshape(-1)
    w = jnp.take(w_rows, rows, axis=0, mode="clip")
    out = jnp.einsum("br,rd->bd", h.astype(w.dtype), w, preferred_element_type=jnp.float32)[None]
    sets = None if scores is None else scores_job_reference(scores)
  else:
    t = _proj_tuning(tuning, b, n_rows, d, op="out")
    if not t.splits:
      want = c.cdiv(OUT_PROGRAMS_PER_SM * c.num_sms(), c.cdiv(d, t.block_d))
      t = dataclasses.replace(t, splits=max(1, min(c.cdiv(n_rows, t.block_k), want)))
    job = {} if scores is None else dict(scores_in=scores[:6], scores=scores.static)
    if parts is None:
      out = tg.gather_matvec_t(h, w_rows, heads, jnp.full((1,), n_rows, jnp.int32), acc=acc, k=n_rows,
                               tuning=t, rowmap=("heads", hd), interpret=interpret, **job)
    else:  # the attention's split outputs, combined in the kernel
      out = tg.gather_matvec_t(parts.o.reshape(-1, b, n_rows), w_rows, heads, jnp.full((1,), n_rows, jnp.int32),
                               attn=(parts.m, parts.l), acc=acc, k=n_rows, tuning=t, rowmap=("heads", hd),
                               h_dtype=jnp.dtype(parts.dtype), interpret=interpret, **job)
    if acc is not None:  # summed in-kernel
      return out if bo is None else out + bo.astype(jnp.float32)
    if scores is not None:
      out, loc, cnt, top = out
      sets = scores.sets(loc, cnt, top)
  if unsummed:
    return out if scores is None else (out, sets)
  out = out.sum(0)
  if bo is not None:
    out = out + bo.astype(jnp.float32)
  return out.astype(out_dtype) if scores is None else (out.astype(out_dtype), sets)
