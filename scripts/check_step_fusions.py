"""GPU check of the fused layer boundaries of a sparse decode step (issue 7): the kernels give
their references' results at OPT shapes, and the decode loop that runs them gives the same
tokens as the XLA ops they replace.

1. `pallas_kernels.layer_norm.add_layer_norm` (bf16, the residual stream's scale) at each
   ``--models`` width: x_new bit for bit, h within bf16 rounding of the reference; the same
   boundary in the Mosaic MLP's kernel (`pallas_kernels.boundary_mlp`, 10% of the neurons):
   x_new bit for bit, the MLP's sum within bf16 rounding of the reference and of the two
   kernels apart;
2. `pallas_kernels.sparse_attention.head_sparse_q_kv_update` at each shape (half the heads,
   a 256-slot cache, a slot in the middle), with K/V for every head and for the selected
   heads only: q and the written K/V within bf16 rounding, every other cache entry unchanged
   (the caches are updated in place); decode attention with per-head valid slots
   (kv_policy "selected") within bf16 rounding; the out-projection that combines the
   attention's split outputs in its kernel within bf16 rounding; the predictors' first GEMV
   and an MLP set's scatter on extra programs of the q + K/V launch (within bf16 rounding,
   exact), the rest unchanged; the next layer's scores on extra programs of the
   out-projection's launch (the sets within rounding of the predictors' reference, the
   output unchanged);
3. decode on a 2-layer f32 model of the first shape: at density 1.0 and every head the fused
   step gives dense_decode's tokens; at 10% / half the heads it gives the unfused step's
   tokens and densities (`dejavu_jax.sparse.fused_glue` off), with either kv_policy; with a
   threshold, the predictor hidden and the MLP-set scatter in the q + K/V launch give the
   tokens and densities of predict_sets' own kernels (`fused_hidden`, `fused_scatter` off);
   the MLP's and out-projection's sums added in-kernel (f32 atomics) give the tokens and
   densities of their written-and-summed partials (`fused_mlp_sum`, `fused_out_sum` off); the
   partials summed by the boundary kernels give the tokens of XLA's sums (`boundary_sums` off);
   the Mosaic boundary before the MLP, both as programmatic dependent launches, gives the
   tokens of the Triton boundary (`mosaic_mlp_boundary` off); the boundary computed in the
   MLP's kernel gives the tokens of its own kernel (`boundary_in_mlp` off);
4. (in 2) the in-kernel sums at each shape: the Mosaic MLP (10% of the neurons) and the
   out-projection adding into a buffer within bf16 rounding of acc + the reference, and
   add_layer_norm(recycle=True) zeroing the buffer it read; add_layer_norm(arrivals=) summing
   the Mosaic MLP's unsummed partials and 27 random ones, 20 calls on the counts it returns;
5. (in 2) programmatic dependent launch: 8 Mosaic boundary + Mosaic MLP pairs chained, the same
   bits with `PDL` on and off, the first pair within bf16 rounding of the references.

Writes ``step_fusions.json`` under --out, prints one line per check; exit 1 on a failure.

    PYTHONPATH=. python3 scripts/check_step_fusions.py --out $OUT/check
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import dejavu_jax as dj
from dejavu_jax import sparse as S
from dejavu_jax.bench import write_checks
from dejavu_jax.bench_sparse import (_jit_args, constants_set, default_rank, fresh_sparse_jit, patched_fusions,
                                     threshold_for_density)
from dejavu_jax.config import preset
from dejavu_jax.model import random_model
from dejavu_jax.predictors.modules import random_predictors
from pallas_kernels import boundary_mlp as bmlp
from pallas_kernels import dispatch
from pallas_kernels import layer_norm as ln
from pallas_kernels import hosted_sets as hs
from pallas_kernels import predict_sets as ps
from pallas_kernels import sparse_attention as sa
from pallas_kernels import sparse_mlp as sm

BF16_TOL = 1e-2  # relative norm error of a bf16 result
PDL_SWITCHES = ("pallas_kernels.layer_norm.PDL", "pallas_kernels._mosaic_mlp.PDL")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_boundary_mlp(name, cfg, w, x, delta, scale, shift) -> dict:
    """The boundary before the MLP in the Mosaic MLP's kernel (`pallas_kernels.boundary_mlp`,
    a 10% live count in a cap of F) against its reference and against the boundary kernel +
    the Mosaic MLP apart (x_new the same bits; y within bf16 rounding)."""
    F, d = cfg.ffn_dim, cfg.hidden_size
    w1, w2t, b1, bo = w(20, (F, d), d**-0.5), w(21, (F, d), F**-0.5), w(22, (F,), 0.1), w(23, (d,), 0.1)
    idx = jax.random.permutation(jax.random.key(24), F).astype(jnp.int32)
    count = jnp.int32(F // 10)
    d32 = delta.astype(jnp.float32)
    got_x, got_y = bmlp.boundary_sparse_mlp(x, d32, scale, shift, w1, b1, w2t, None, idx, count=count, bias=bo,
                                            impl="mosaic", checked=False, out_dtype=jnp.float32)
    want_x, want_y = bmlp.boundary_sparse_mlp_reference(x, d32, scale, shift, w1, b1, w2t, None, idx, count=count,
                                                         bias=bo, out_dtype=jnp.float32)
    x2, h2 = ln.add_layer_norm(x, d32, scale, shift, 1e-5, bias=bo, impl="mosaic")
    apart = sm.sparse_mlp(h2, w1, b1, w2t, None, idx, count=count, impl="mosaic", checked=False, out_dtype=jnp.float32)
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    same_x = bool((f(got_x) == f(want_x)).all()) and bool((f(got_x) == f(x2)).all())
    err, err_apart = _rel(f(got_y), f(want_y)), _rel(f(got_y), f(apart))
    return dict(check="boundary + sparse MLP in one Mosaic kernel vs reference and vs the two kernels apart",
                model=name, same_x_new=same_x, y_rel_err=err, y_rel_err_vs_apart=err_apart,
                ok=same_x and err < BF16_TOL and err_apart < BF16_TOL)


def check_shape(name: str) -> list[dict]:
    cfg = preset(name)
    d, H, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    key = jax.random.key(0)
    w = lambda i, shape, scale: (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)  # noqa: E731
                                 * scale).astype(jnp.bfloat16)
    x, delta = w(1, (1, d), 4.0) + 0.5, w(2, (1, d), 1.0)
    scale, shift = w(3, (d,), 1.0), w(4, (d,), 0.1)
    x_new, h = ln.add_layer_norm(x, delta, scale, shift, 1e-5, impl="triton")
    want_x, want_h = ln.add_layer_norm_reference(x, delta, scale, shift, 1e-5)
    same_x = bool((np.asarray(x_new, np.float32) == np.asarray(want_x, np.float32)).all())
    err_h = _rel(np.asarray(h, np.float32), np.asarray(want_h, np.float32))
    out = [dict(check="add_layer_norm vs reference", model=name, same_x_new=same_x, h_rel_err=err_h,
                ok=same_x and err_h < BF16_TOL)]
    out.append(check_boundary_mlp(name, cfg, w, x, delta, scale, shift))
    wqkv, bqkv = w(5, (3, H, hd, d), d**-0.5), w(6, (3, H, hd), 0.5)
    heads = jax.random.permutation(jax.random.fold_in(key, 7), H)[:H // 2].astype(jnp.int32)
    kc, vc = w(8, (1, H, 256, hd), 1.0), w(9, (1, H, 256, hd), 1.0)
    slot = jnp.int32(130)
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    for kv_heads in ("all", "selected"):
        want = sa.head_sparse_q_kv_update_reference(h, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5,
                                                    kv_heads=kv_heads)
        got = sa.head_sparse_q_kv_update(h, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads=kv_heads,
                                         impl="triton")
        new = np.zeros((H, 256), bool)  # the (head, slot) pairs written
        new[np.arange(H) if kv_heads == "all" else np.asarray(heads), 130] = True
        errs = [_rel(f(got[0]), f(want[0]))] + [_rel(f(g)[:, new], f(r)[:, new]) for g, r in zip(got[1:], want[1:])]
        untouched = all(bool((f(g)[:, ~new] == f(o)[:, ~new]).all()) for g, o in zip(got[1:], (kc, vc)))
        out.append(dict(check=f"head_sparse_q_kv_update (K/V heads: {kv_heads}) vs reference", model=name,
                        q_rel_err=errs[0], k_rel_err=errs[1], v_rel_err=errs[2], other_slots_unchanged=untouched,
                        ok=untouched and max(errs) < BF16_TOL))
    # the next layer's predictor hidden on extra programs of the same launch (rank as benched)
    r = default_rank(d)
    w1t = hs.stack_w1t(w(12, (4, d, r), d**-0.5), w(13, (4, d, r), d**-0.5))
    side = hs.hidden_gemv(x, w1t, 2, r, r)
    # and an MLP set before its scatter: 64-neuron tiles, about 10% members each, cap 20% of F
    rng = np.random.default_rng(0)
    F = cfg.ffn_dim
    member = rng.random((F // 64, 64)) < 0.1
    loc = np.zeros(member.shape, np.int32)
    for t, row in enumerate(member):
        loc[t, :row.sum()] = t * 64 + np.flatnonzero(row)
    tiles = ps.TileSets(jnp.asarray(loc), jnp.asarray(member.sum(1), jnp.int32), F // 5)
    want_idx, want_count = hs.scatter_sets_reference(tiles)
    for kv_heads in ("all", "selected"):
        plain = sa.head_sparse_q_kv_update(h, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads=kv_heads,
                                           impl="triton")
        with_side = sa.head_sparse_q_kv_update(h, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5,
                                               kv_heads=kv_heads, side=side, scatter=tiles, impl="triton")
        same = all(bool((f(a) == f(b)).all()) for a, b in zip(plain, with_side))
        err = _rel(with_side[-3], hs.side_gemv_reference(side))
        sets_ok = bool((np.asarray(with_side[-2]) == np.asarray(want_idx)).all()) and int(with_side[-1]) == int(
            want_count)
        out.append(dict(check=f"head_sparse_q_kv_update with the predictor hidden and an MLP set's scatter (K/V "
                              f"heads: {kv_heads})", model=name, rank=r, hidden_rel_err=err, scatter_exact=sets_ok,
                        rest_unchanged=same, ok=same and sets_ok and err < BF16_TOL))
    # kv_policy "selected": the same kernel marks the selected heads' slots valid (in place) ...
    q = got[0]
    kv_mask = jnp.arange(256)[None] < 200
    head_valid = jax.random.bernoulli(jax.random.fold_in(key, 10), 0.5, (1, H, 256))
    marked = sa.head_sparse_q_kv_update(h, wqkv, bqkv, heads, kc, vc, slot, q_scale=hd**-0.5, kv_heads="selected",
                                        head_valid=head_valid, impl="triton")[3]
    want_hv = sa.head_sparse_q_kv_update_reference(h, wqkv, bqkv, heads, kc, vc, slot, kv_heads="selected",
                                                   head_valid=head_valid)[3]
    out.append(dict(check="head_sparse_q_kv_update marks head_valid", model=name,
                    ok=bool((np.asarray(marked) == np.asarray(want_hv)).all())))
    # ... and the attention reads each head's own valid slots (half of them, at random)
    want = sa.head_sparse_decode_attention_reference(q, kc, vc, heads, kv_mask, head_valid)
    got = sa.head_sparse_decode_attention(q, kc, vc, heads, kv_mask, head_valid=head_valid, impl="triton")
    err = _rel(f(got), f(want))
    out.append(dict(check="head_sparse_decode_attention with head_valid vs reference", model=name, rel_err=err,
                    ok=err < BF16_TOL))
    # the next layer's scores on extra programs of the out-projection's launch
    mlp = (w(14, (4, d, r), d**-0.5), w(15, (4, r, F), r**-0.5), w(16, (4, F), 1.0))
    head = (w(17, (4, d, r), d**-0.5), w(18, (4, r, H), r**-0.5), w(19, (4, H), 1.0))
    hidden = hs.side_gemv_reference(hs.hidden_gemv(x, hs.stack_w1t(mlp[0], head[0]), 2, r, r))
    job = hs.scores_job(mlp, head, 1.28, hidden, layer=2, mlp_k=F, head_k=H // 2)  # about 10% above
    wo_t = w(11, (H, hd, d), d**-0.5)
    plain = sa.head_sparse_out(q, wo_t, None, heads, impl="triton", out_dtype=jnp.float32)
    hosted, (top, tiles) = sa.head_sparse_out(q, wo_t, None, heads, impl="triton", out_dtype=jnp.float32,
                                              scores=job)
    idx, count = hs.scatter_sets_reference(tiles)
    bad = ps.sets_disagreement((top, idx, count), x, mlp, head, 1.28, layer=2, mlp_k=F, head_k=H // 2, tol=3e-2)
    same = bool((f(hosted) == f(plain)).all())
    out_recs = [dict(check="head_sparse_out with the next layer's scores vs predictors' reference", model=name,
                     rank=r, mlp_density=int(count) / F, disagreements=bad, out_unchanged=same, ok=same and not bad)]
    # the out-projection combining the attention's split outputs in its kernel
    parts = sa.head_sparse_decode_attention(q, kc, vc, heads, kv_mask, head_valid=head_valid, impl="triton",
                                            combine=False)
    got = sa.head_sparse_out(parts, wo_t, None, heads, impl="triton", out_dtype=jnp.float32)
    want = sa.head_sparse_out_reference(parts.combine(), wo_t, None, heads, out_dtype=jnp.float32)
    err = _rel(f(got), f(want))
    out.append(dict(check="head_sparse_out of attention partials vs reference of the combined output", model=name,
                    splits=int(parts.o.shape[0]), rel_err=err, ok=err < BF16_TOL))
    return out + out_recs + check_sums(name, cfg, q, wo_t, heads, x, scale, shift, w) + check_pdl(name, cfg, x, w)


def check_pdl(name, cfg, x, w, links: int = 8) -> list[dict]:
    """Programmatic dependent launch: the Mosaic boundary kernel then the Mosaic MLP (its first
    rows loaded before it waits for the boundary), ``links`` such pairs chained in one jit, each
    MLP's output the next boundary's delta, a threshold-like count: with `PDL` on, the same bits
    as with it off (a read before the wait would show), and the first pair within bf16 rounding
    of the references."""
    d, F = cfg.hidden_size, cfg.ffn_dim
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    fc1, fc2t, b1 = w(40, (F, d), d**-0.5), w(41, (F, d), F**-0.5), w(42, (F,), 0.5)
    scale, shift, bias = w(43, (d,), 1.0) + 1.0, w(44, (d,), 0.1), w(45, (d,), 0.5)
    idx = jax.random.permutation(jax.random.key(46), F)[:F // 5].astype(jnp.int32)
    count = jnp.int32(F // 10)  # half the cap, as a threshold's set
    delta0 = w(47, (1, d), 1.0).astype(jnp.float32)

    def chain(x, delta):
        outs = []
        for _ in range(links):
            x, h = ln.add_layer_norm(x, delta, scale, shift, 1e-5, bias=bias, impl="mosaic")
            delta = sm.sparse_mlp(h, fc1, b1, fc2t, None, idx, count=count, impl="mosaic", checked=False,
                                  out_dtype=jnp.float32)
            outs.append((x, h, delta))
        return outs

    runs = {}
    for on in (False, True):
        with constants_set(dict.fromkeys(PDL_SWITCHES, on)):
            runs[on] = jax.device_get(jax.jit(chain)(x, delta0))
    same = all(bool((f(a) == f(b)).all()) for pa, pb in zip(runs[False], runs[True]) for a, b in zip(pa, pb))
    x1, h1, y1 = runs[True][0]
    want_x, want_h = ln.add_layer_norm_reference(x, delta0, scale, shift, 1e-5, bias)
    want_y = sm.sparse_mlp_reference(want_h, fc1, b1, fc2t, None, idx, count=count, out_dtype=jnp.float32)
    errs = dict(x_new_same=bool((f(x1) == f(want_x)).all()), h_rel_err=_rel(f(h1), f(want_h)),
                mlp_rel_err=_rel(f(y1), f(want_y)))
    ok = same and errs["x_new_same"] and errs["h_rel_err"] < BF16_TOL and errs["mlp_rel_err"] < BF16_TOL
    return [dict(check=f"Mosaic boundary + Mosaic MLP as programmatic dependent launches, {links} pairs chained: "
                 "same bits as without, first pair vs references", model=name, same_bits_as_without_pdl=same,
                 **errs, ok=ok)]


def check_sums(name, cfg, o, wo_t, heads, x, scale, shift, w) -> list[dict]:
    """The sums added in-kernel into a buffer (f32 atomics), and the boundary kernel zeroing it."""
    d, F = cfg.hidden_size, cfg.ffn_dim
    acc = w(20, (1, d), 4.0).astype(jnp.float32)
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    got = sa.head_sparse_out(o, wo_t, None, heads, impl="triton", acc=acc)
    err = _rel(f(got) - f(acc), f(sa.head_sparse_out_reference(o, wo_t, None, heads, out_dtype=jnp.float32)))
    recs = [dict(check="head_sparse_out adding into a buffer (atomics) vs reference", model=name, rel_err=err,
                 ok=err < BF16_TOL)]
    fc1, fc2t, b1 = w(21, (F, d), d**-0.5), w(22, (F, d), F**-0.5), w(23, (F,), 0.5)
    idx = jax.random.permutation(jax.random.key(24), F)[:F // 10].astype(jnp.int32)
    want = sm.sparse_mlp_reference(x, fc1, b1, fc2t, None, idx, out_dtype=jnp.float32)
    for copies in (1, 8):
        buf = jnp.concatenate([acc[None], jnp.zeros((copies - 1, 1, d), jnp.float32)])
        got = [sm.sparse_mlp(x, fc1, b1, fc2t, None, idx, impl="mosaic", checked=False, acc=buf).sum(0)
               for _ in range(2)]
        errs = [_rel(f(g) - f(acc), f(want)) for g in got]
        recs.append(dict(check=f"Mosaic sparse MLP adding into {copies} copies of a buffer (atomics) vs reference, "
                         "twice", model=name, rel_errs=errs,
                         max_abs_diff_between_runs=float(np.abs(f(got[0]) - f(got[1])).max()), ok=max(errs) < BF16_TOL))
    buf = jnp.stack([acc, acc * 0.5, -acc])
    x_new, h, zeros = ln.add_layer_norm(x, buf, scale, shift, 1e-5, impl="triton", recycle=True)
    want_x, want_h = ln.add_layer_norm_reference(x, buf, scale, shift, 1e-5)
    ok = bool((f(x_new) == f(want_x)).all()) and _rel(f(h), f(want_h)) < BF16_TOL and not np.any(f(zeros))
    recs.append(dict(check="add_layer_norm(recycle=True) of 3 copies vs reference, buffer zeroed", model=name, ok=ok))
    return recs + check_boundary_sums(name, x, scale, shift, w, sm.sparse_mlp(
        x, fc1, b1, fc2t, None, idx, impl="mosaic", checked=False, unsummed=True), want)


def check_boundary_sums(name, x, scale, shift, w, mlp_parts, mlp_want) -> list[dict]:
    """The boundary kernel summing partials over many programs (`add_layer_norm(arrivals=)`):
    the Mosaic MLP's partials at 10% and random ones, 20 calls in a row on the counts each call
    returns (any program may be a row's last on the GPU), against the reference."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    d = x.shape[1]
    recs = [dict(check="Mosaic sparse MLP unsummed partials vs reference", model=name, partials=int(mlp_parts.shape[0]),
                 rel_err=_rel(f(mlp_parts.sum(0)), f(mlp_want)), ok=_rel(f(mlp_parts.sum(0)), f(mlp_want)) < BF16_TOL)]
    bias = w(30, (d,), 0.5)
    for label, parts in (("the Mosaic MLP's partials", mlp_parts), ("27 random partials", w(31, (27, 1, d), 1.0)
                                                                      .astype(jnp.float32))):
        want_x, want_h = ln.add_layer_norm_reference(x, parts, scale, shift, 1e-5, bias)
        arrivals, errs, counts_zero = jnp.zeros((1,), jnp.int32), [], True
        step = jax.jit(lambda x, p, a: ln.add_layer_norm(x, p, scale, shift, 1e-5, bias=bias, impl="triton",
                                                         arrivals=a))
        for _ in range(20):
            x_new, h, arrivals = step(x, parts, arrivals)
            errs.append(max(_rel(f(x_new), f(want_x)), _rel(f(h), f(want_h))))
            counts_zero &= not np.any(np.asarray(arrivals))
        recs.append(dict(check=f"add_layer_norm(arrivals=) summing {label} vs reference, 20 calls on the returned "
                         "counts", model=name, partials=int(parts.shape[0]), max_rel_err=max(errs),
                         counts_zero=bool(counts_zero), ok=max(errs) < BF16_TOL and bool(counts_zero)))
    return recs


def check_decode(cfg, new_tokens: int = 12) -> list[dict]:
    model = random_model(cfg, jnp.float32)
    pred = random_predictors(cfg, 256, mlp_density=1.0, head_keep=1.0, dtype=jnp.float32)
    prompt = np.random.default_rng(1).integers(4, cfg.vocab_size, (1, 16)).astype(np.int32)
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in the dense f32 path
    dense = np.asarray(dj.dense_decode(model, prompt, new_tokens))
    full = dj.sparse_decode(model, pred, prompt, new_tokens, sparsity=S.SparsityConfig(mlp_density=1.0, head_keep=1.0))
    recs = [dict(check="fused step, density 1.0 == dense_decode", fused=S.fused_glue("auto", 1),
                 same_tokens=bool((np.asarray(full) == dense).all()))]
    recs[-1]["ok"] = recs[-1]["same_tokens"] and recs[-1]["fused"]
    def fused_vs_unfused(keys, sp, check, **extra):
        """Same-run decode with the fusions ``keys`` as dispatched and off: same tokens, densities."""
        args, kw = _jit_args(model, prompt, new_tokens, dict(sparsity=sp, budgets=sp.layer_budgets(cfg, pred)))
        runs = {}
        for kind in ("auto", "unfused"):
            with patched_fusions(dict.fromkeys(keys, kind)):
                runs[kind] = jax.device_get(fresh_sparse_jit()(model, pred.astype(model.dtype), *args, **kw))
        (t1, s1), (t2, s2) = runs["auto"], runs["unfused"]
        rec = dict(check=check, same_tokens=bool((t1 == t2).all()),
                   same_densities=bool((s1["mlp_density"] == s2["mlp_density"]).all()),
                   mlp_density=float(np.mean(s1["mlp_density"])), **extra)
        rec["ok"] = rec["same_tokens"] and rec["same_densities"] and rec.get("fused", True)
        return rec

    thr = threshold_for_density(pred, cfg, 0.1)
    for kv_policy in ("all", "selected"):
        recs.append(fused_vs_unfused(("glue",), S.SparsityConfig(mlp_density=0.1, head_keep=0.5, kv_policy=kv_policy),
                                     f"fused vs unfused step, 10% / half the heads, kv_policy {kv_policy}"))
        # a threshold's sets: layer 1's predictor hidden from layer 0's q + K/V launch, each layer's
        # MLP set scattered in its own q + K/V launch; or predict_sets' own kernels
        sp = S.SparsityConfig(mlp_density=1.0, mlp_threshold=thr, head_keep=0.5, kv_policy=kv_policy)
        recs.append(fused_vs_unfused(("hidden", "scatter", "scores"), sp, "the sets hosted by the q + K/V launches "
                                     f"(the scores by the attention's) vs their own kernels, threshold, kv_policy "
                                     f"{kv_policy}", fused=S.fused_hidden("auto", 1) and S.fused_scatter("auto", 1),
                                     scores_hosted=S.fused_scores("auto", 1)))
        with constants_set({"dejavu_jax.sparse.SCORES_IN_ATTENTION": False,  # off by default (measured slower)
                            "dejavu_jax.sparse.SCORES_IN_OUT_PROJECTION": True}):
            recs.append(fused_vs_unfused(("scores",), sp, "the scores hosted by the out-projection's launch vs "
                                         f"their own kernel, threshold, kv_policy {kv_policy}",
                                         fused=S.fused_scores("auto", 1)))
        # off by default (measured slower or no faster), on for these checks: both in-kernel sums, the
        # Mosaic boundary with PDL, the partials summed by the boundary kernels
        with constants_set({"dejavu_jax.sparse.MLP_SUM_COPIES": 8, "dejavu_jax.sparse.OUT_SUM_IN_KERNEL": True}):
            recs.append(fused_vs_unfused(("mlp_sum", "out_sum"), sp, "the MLP's (8 copies) and out-projection's sums "
                                         f"added in-kernel vs written and summed, threshold, kv_policy {kv_policy}",
                                         fused=S.fused_mlp_sum("auto", 1) and S.fused_out_sum("auto", 1)))
        # (with the boundary in its own kernel: in the MLP's, on by default, there is no boundary kernel)
        with constants_set({"dejavu_jax.sparse.MOSAIC_MLP_BOUNDARY": True, "dejavu_jax.sparse.BOUNDARY_IN_MLP": False,
                            **dict.fromkeys(PDL_SWITCHES, True)}):
            recs.append(fused_vs_unfused(("mlp_boundary",), sp, "the Mosaic boundary before the MLP, both as "
                                         "programmatic dependent launches, vs the Triton boundary, threshold, "
                                         f"kv_policy {kv_policy}", fused=S.mosaic_mlp_boundary("auto", 1)))
        recs.append(fused_vs_unfused(("boundary_in_mlp",), sp, "the boundary before the MLP in the MLP's kernel "
                                     f"vs its own kernel, threshold, kv_policy {kv_policy}",
                                     fused=S.boundary_in_mlp("auto", 1)))
        with constants_set({"dejavu_jax.sparse.SUMS_IN_BOUNDARY": ("out", "mlp")}):  # off by default (no faster)
            recs.append(fused_vs_unfused(("boundary_sums",), sp, "the partials summed by the boundary kernels vs by "
                                         f"XLA, threshold, kv_policy {kv_policy}", fused=S.boundary_sums("auto", 1)))
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="opt-13b,opt-30b,opt-1.3b")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    models = args.models.split(",")
    recs = [r for m in models for r in check_shape(m)]
    recs += check_decode(preset(models[0]).replace(num_hidden_layers=2))
    return write_checks(recs, args.out, "step_fusions", "step fusions",
                        backend=dispatch.backend_for("add_layer_norm"))

if __name__ == "__main__":
    sys.exit(main())
