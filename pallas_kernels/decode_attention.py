"""Decode attention over the selected heads' KV cache only (flash-decoding), with reference.

    head_sparse_decode_attention(q [B, k_h, hd] (already scaled), k_cache, v_cache
        [B, H, S, hd], heads [k_h], kv_mask [B, S]) -> [B, k_h, hd] in q.dtype

Softmax in f32; a row with no valid cached position gives zeros. The Triton kernel splits the
sequence across programs; the partial (max, sum, output) triples are combined in XLA, or
handed on as `AttentionPartials` for the out-projection to combine per tile. With one split
(a short cache, or `MAX_SEQ_SPLITS` = 1) the kernel normalizes its output itself. A bool kv_mask
(or head_valid) is read as bytes. Also the heads' checks shared with
`pallas_kernels.sparse_attention`, which re-exports this module's public names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels import _common as c
from pallas_kernels.hosted_sets import scores_job_reference
from pallas_kernels.predict_sets import hosted_scores_outputs, hosted_scores_tile


MAX_SEQ_SPLITS = 0  # a cap on the automatic splits along S (0: none); with 1 split no combine runs


@dataclasses.dataclass(frozen=True)
class DecodeAttentionTuning:
  """block_s cached positions per step; seq_splits programs along S (0 = auto)."""
  block_s: int = 64
  seq_splits: int = 0
  num_warps: int = 4
  num_stages: int = 1


# ----------------------------------------------------------------------------- reference
def _valid(kv_mask, head_valid, heads):
  """[B, 1 or k_h, S] bool: kv_mask [B, S], and head_valid [B, H, S] of the heads if given."""
  valid = kv_mask[:, None, :].astype(bool)
  return valid if head_valid is None else valid & (head_valid[:, heads] != 0)


def head_sparse_decode_attention_reference(q, k_cache, v_cache, heads, kv_mask, head_valid=None):
  """softmax(q . K[heads]) V[heads] over valid positions (kv_mask, and head_valid of the
  head where given), f32; zeros if none valid."""
  k = k_cache[:, heads].astype(jnp.float32)  # [B, k_h, S, hd]
  v = v_cache[:, heads].astype(jnp.float32)
  s = jnp.einsum("bhe,bhse->bhs", q.astype(jnp.float32), k)
  valid = _valid(kv_mask, head_valid, heads)
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhs,bhse->bhe", p, v) / jnp.where(l > 0, l, 1.0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- checks


def _check_heads(heads, n_heads, checked):
  c.check_index_dtype("heads", heads)
  if checked and c.is_concrete(heads):
    c.validate_indices(heads, n_heads, None, name="heads", what="heads")


def _resolve(impl, op, batch):
  impl = c.resolve_impl(impl, op, batch)
  if impl == "mosaic":
    impl = "triton"  # no Mosaic GPU variant of the attention kernels yet
  return impl, c.on_cpu()


# ----------------------------------------------------------------------------- decode attention


def _attn_kernel(heads_ref, q_ref, k_ref, v_ref, m_ref, hv_ref, *refs, n_stats, k_h, scores, **kw):
  """refs: [the scores job's 6 inputs,] o, n_stats (max, sum) refs of each split (none with one
  split, whose output is final)[, the job's loc, cnt, heads]. With ``scores`` (a
  `hosted_sets.ScoresJob`'s kernel parameters) the programs with head index >= k_h run its
  tiles (`predict_sets.scores_tile`), the others attend."""
  b, i, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)  # (read here: interpret mode
  if scores is None:                                                 # has no program ids in a branch)
    o_ref, *stats = refs
    _attend(b, i, sp, heads_ref, q_ref, k_ref, v_ref, m_ref, hv_ref, o_ref, stats, **kw)
    return
  job_refs, (o_ref, *rest) = refs[:6], refs[6:]
  stats, sets_refs = rest[:n_stats], rest[n_stats:]
  t = (i - k_h) * pl.num_programs(2) + sp

  @pl.when(i >= k_h)
  def _():
    hosted_scores_tile(t, job_refs, sets_refs, scores)

  @pl.when(i < k_h)
  def _():
    _attend(b, i, sp, heads_ref, q_ref, k_ref, v_ref, m_ref, hv_ref, o_ref, stats, **kw)


def _attend(b, i, sp, heads_ref, q_ref, k_ref, v_ref, m_ref, hv_ref, o_ref, stats, *, block_s, seq, hd, hd_pad,
            per_split, has_hv):
  """Program (b, i, sp): head i's attention over split sp of the cache."""
  head = heads_ref[i]
  cols = jnp.arange(hd_pad)
  col_ok = cols < hd
  q = pltr.load(q_ref.at[b, i, cols], mask=col_ok, other=0).astype(jnp.float32)

  def tiles(j, more=True):
    pos = (sp * per_split + j) * block_s + jnp.arange(block_s)
    ok = (pos < seq) & more
    ok2 = ok[:, None] & col_ok[None, :]
    kt = pltr.load(k_ref.at[b, head, pos[:, None], cols[None, :]], mask=ok2, other=0)
    vt = pltr.load(v_ref.at[b, head, pos[:, None], cols[None, :]], mask=ok2, other=0)
    valid = pltr.load(m_ref.at[b, pos], mask=ok, other=0) != 0
    if has_hv:  # the head's own validity (kv_policy "selected": slots it was computed for)
      valid = valid & (pltr.load(hv_ref.at[b, head, pos], mask=ok, other=0) != 0)
    return kt, vt, valid

  def body(j, carry):
    m, l, acc, kt, vt, valid = carry
    nk, nv, nvalid = tiles(jnp.minimum(j + 1, per_split - 1), more=j + 1 < per_split)
    s = jnp.sum(kt.astype(jnp.float32) * q[None, :], axis=1)  # [block_s]
    s = jnp.where(valid, s, -1e30)
    m_new = jnp.maximum(m, jnp.max(s))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
    l = l * alpha + jnp.sum(p)
    acc = acc * alpha + jnp.sum(p[:, None] * vt.astype(jnp.float32), axis=0)
    return m_new, l, acc, nk, nv, nvalid

  init = (jnp.float32(-1e30), jnp.float32(0.0), jnp.zeros((hd_pad,), jnp.float32), *tiles(0))
  m, l, acc, *_ = lax.fori_loop(0, per_split, body, init)
  if not stats:  # one split: normalized here, no combine after the kernel
    pltr.store(o_ref.at[b, i, cols], (acc / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype), mask=col_ok)
    return
  mx_ref, l_ref = stats
  pltr.store(o_ref.at[sp, b, i, cols], acc, mask=col_ok)
  mx_ref[sp, b, i] = m
  l_ref[sp, b, i] = l


class AttentionPartials(NamedTuple):
  """Decode attention before its combine (flash-decoding): o f32 [S, B, k_h, hd] (unnormalized
  outputs of S sequence splits), m / l f32 [S, B, k_h] (their score maxima and exp sums), and
  the dtype of the combined output. `head_sparse_out` takes it in place of o and combines it
  in its kernel (one XLA kernel a layer less)."""
  o: jax.Array
  m: jax.Array
  l: jax.Array
  dtype: Any

  def combine(self) -> jax.Array:
    """-> [B, k_h, hd] in self.dtype: sum_s o[s] e^(m[s] - max m) / sum_s l[s] e^(m[s] - max m)."""
    m_all = jnp.max(self.m, axis=0)
    scale = jnp.exp(self.m - m_all[None])
    l_all = jnp.sum(self.l * scale, axis=0)
    out = jnp.sum(self.o * scale[..., None], axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    return out.astype(self.dtype)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "partials", "scores"))
def _decode_attention_triton(q, k_cache, v_cache, heads, kv_mask, head_valid=None, scores_in=(), *,
                             tuning: DecodeAttentionTuning, interpret: bool, partials: bool = True, scores=None):
  """(o, m, l) of the splits; with one split and not ``partials``, (the final output,). With
  ``scores`` (static: `hosted_sets.ScoresJob.static`; batch 1) and
  scores_in (hidden, w2m, b2m, w2h, b2h, thr): the job on programs after the heads' (extra
  head indices of the grid), its (loc [n_tiles, T], cnt [n_tiles], heads [head_k]) int32 after."""
  b, k_h, hd = q.shape
  seq = k_cache.shape[2]
  bs = min(tuning.block_s, c.next_pow2(seq))
  n_blocks = c.cdiv(seq, bs)
  splits = tuning.seq_splits or c.cdiv(2 * c.num_sms(), max(1, b * k_h))
  splits = max(1, min(splits, n_blocks, MAX_SEQ_SPLITS or n_blocks))
  per_split = c.cdiv(n_blocks, splits)
  splits = c.cdiv(n_blocks, per_split)
  final = splits == 1 and not partials
  kernel = functools.partial(_attn_kernel, block_s=bs, seq=seq, hd=hd, hd_pad=c.next_pow2(hd),
                             per_split=per_split, has_hv=head_valid is not None, n_stats=0 if final else 2,
                             k_h=k_h, scores=scores)
  f32 = jnp.float32
  # a bool mask is read as bytes as it is: converting it was an XLA kernel a layer (1.3 us at 13B)
  mask = kv_mask if kv_mask.dtype == jnp.bool_ else kv_mask.astype(jnp.int32)
  out_shape = ((jax.ShapeDtypeStruct((b, k_h, hd), q.dtype),) if final else
               (jax.ShapeDtypeStruct((splits, b, k_h, hd), f32), jax.ShapeDtypeStruct((splits, b, k_h), f32),
                jax.ShapeDtypeStruct((splits, b, k_h), f32)))
  rows = k_h
  if scores is not None:
    assert b == 1, "a hosted scores job is batch 1"
    sets_shapes, programs = hosted_scores_outputs(scores)
    out_shape += sets_shapes
    rows += c.cdiv(programs, splits)
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(b, rows, splits),
      compiler_params=pltr.CompilerParams(num_warps=tuning.num_warps,
                                          num_stages=tuning.num_stages),
      interpret=interpret, name="dejavu_head_sparse_decode_attention",
  )(heads.astype(jnp.int32), q, k_cache, v_cache, mask, mask if head_valid is None else head_valid,  # bool as bytes
    *scores_in)


def _decode_attention_xla(q, k_cache, v_cache, heads, kv_mask, head_valid=None):
  """XLA path: gather the heads' cache, einsums in the cache dtype with f32 accumulation."""
  k = jnp.take(k_cache, heads, axis=1, mode="clip")
  v = jnp.take(v_cache, heads, axis=1, mode="clip")
  s = jnp.einsum("bhe,bhse->bhs", q.astype(k.dtype), k, preferred_element_type=jnp.float32)
  valid = _valid(kv_mask, head_valid, heads)
  s = jnp.where(valid, s, -1e30)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhs,bhse->bhe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / jnp.where(l > 0, l, 1.0)).astype(q.dtype)


def head_sparse_decode_attention(q, k_cache, v_cache, heads, kv_mask, *, head_valid=None, impl="auto",
                                 tuning: DecodeAttentionTuning | None = None,
                                 checked: bool = True, combine: bool = True, scores=None):
  """Decode attention over the selected heads' cache only -> [B, k_h, hd] in q.dtype.
  head_valid: None or [B, H, S] (bool or integer; nonzero = that head's slot holds K/V, as
  kv_policy "selected" keeps it): a position counts for a head where kv_mask and its
  head_valid both allow it. combine=False: an `AttentionPartials` instead (the Triton kernel's
  split outputs; other paths give one split of the combined output), for `head_sparse_out`.
  With ``scores`` (a `pallas_kernels.hosted_sets.ScoresJob`, batch 1: the next layer's sets
  from its predictor hidden) returns (that, (heads, TileSets)); on Triton the job runs on extra
  programs of the attention's launch, whose few programs leave most SMs idle."""
  c.check_array("q", q, ndim=3, dtypes=c.FLOAT_DTYPES, hint="q is [batch, k_heads, head_dim].")
  c.check_array("k_cache", k_cache, ndim=4, dtypes=c.FLOAT_DTYPES,
                hint="k_cache is [batch, n_heads, seq, head_dim].")
  b, n_heads, seq, hd = k_cache.shape
  c.check_array("k_cache", k_cache, shape=(q.shape[0], None, None, q.shape[2]),
                hint="k_cache is [batch, n_heads, seq, head_dim] matching q.")
  c.check_array("v_cache", v_cache, shape=k_cache.shape, dtypes=(k_cache.dtype,))
  c.check_array("q", q, shape=(b, heads.shape[0], hd), hint="q is [batch, len(heads), head_dim].")
  c.check_array("kv_mask", kv_mask, shape=(b, seq),
                hint="kv_mask is [batch, seq]: True where a cached position is valid.")
  if head_valid is not None:
    c.check_array("head_valid", head_valid, shape=(b, n_heads, seq),
                  dtypes=(jnp.bool_, jnp.int8, jnp.uint8, jnp.int32),
                  hint="head_valid is [batch, n_heads, seq]: nonzero where a head's cached slot is valid.")
  _check_heads(heads, n_heads, checked)
  if scores is not None and b != 1:
    raise ValueError(f"a scores job (the next layer's sets) goes with batch 1, got batch {b}.")
  impl, interpret = _resolve(impl, "head_sparse_decode_attention", b)
  if impl == "reference" or heads.shape[0] == 0 or seq == 0 or impl == "xla":
    fn = head_sparse_decode_attention_reference if impl != "xla" else _decode_attention_xla
    out = fn(q, k_cache, v_cache, heads, kv_mask, head_valid)
    if not combine:
      ones = jnp.ones((1, *out.shape[:2]), jnp.float32)  # one split: e^0 / 1
      out = AttentionPartials(out.astype(jnp.float32)[None], ones * 0.0, ones, q.dtype)
    return out if scores is None else (out, scores_job_reference(scores))
  job = {} if scores is None else dict(scores_in=tuple(scores[:6]), scores=scores.static)
  got = _decode_attention_triton(q, k_cache, v_cache, heads, kv_mask, head_valid,
                                 tuning=tuning or DecodeAttentionTuning(), interpret=interpret, partials=not combine,
                                 **job)
  sets = None
  if scores is not None:
    *got, loc, cnt, top = got
    sets = scores.sets(loc, cnt, top)
  if len(got) == 1:  # one split, normalized in the kernel
    out = got[0]
  else:
    parts = AttentionPartials(*got, q.dtype)
    out = parts.combine() if combine else parts
  return out if scores is None else (out, sets)
