"""Where a batch-1 sparse decode step's time goes, piece by piece, and which tuning of each
weight kernel runs nearest the measured peak bandwidth.

At an OPT shape, each piece of a layer (dense GEMVs for reference, the head projections, the
Mosaic MLP at a threshold's live count, the predictors, the set selection) runs over L
unrolled layers with distinct weights (as in decoding, so nothing stays in L2), each layer's
input depending on the previous layer's output. Times per layer: CUPTI kernel time (minus the
chain's own glue kernel, measured by the "glue" piece) and wall time. Weight kernels also get
GB/s and the fraction of the peak read bandwidth measured in the same run.

    PYTHONPATH=. python3 scripts/profile_sparse_layer.py --models opt-13b,opt-30b --out $OUT
    PYTHONPATH=. python3 scripts/profile_sparse_layer.py --smoke        # CPU, a tiny model

Writes layer_kernels.json (records + peak) and layer_kernels.png, and prints a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.bench import dump_json, environment, peak_read_bandwidth, time_fn
from dejavu_jax.bench_sparse import default_rank
from dejavu_jax.config import OPTConfig, preset
from dejavu_jax.predictors.modules import predict_head_scores, predict_mlp_scores, random_predictors
from dejavu_jax.sparse import decode_scores, matvec_scores, select
from pallas_kernels import _mosaic_mlp as mm
from pallas_kernels import _triton_gemv as tg
from pallas_kernels.matvec import auto_tuning as matvec_auto
from pallas_kernels.predict_sets import SetsTuning, predict_sets, sets_disagreement
from pallas_kernels.select import threshold_compact
from pallas_kernels.sparse_attention import HeadProjTuning, head_sparse_out, head_sparse_q_kv_update, head_sparse_qkv
from dejavu_jax.figures import save_figure

F32 = jnp.float32
PROJ_TUNINGS = {  # HeadProjTuning variants timed for the K/V, Q and out projections
    "auto": None,
    "bk8": HeadProjTuning(block_k=8),
    "bk4": HeadProjTuning(block_k=4),
    "bk16_bd1024": HeadProjTuning(block_k=16, block_d=1024),
    "bk8_bd1024_w8": HeadProjTuning(block_k=8, block_d=1024, num_warps=8),
    "bk16_bd256": HeadProjTuning(block_k=16, block_d=256),
    "bk16_s2": HeadProjTuning(block_k=16, splits=2),
}
SETS_TUNINGS = {  # predict_sets variants: w1 tile rows x cols, neurons per scores program, warps, prep
    "auto": None,
    "c32": SetsTuning(rows=256, cols=32, tile=64, warps=(8, 8, 4)),
    "r1024_w8": SetsTuning(rows=1024, cols=16, warps=(8, 8, 4)),
    "xla_prep": SetsTuning(prep="xla"),
    "xla_prep_c32": SetsTuning(rows=256, cols=32, tile=64, warps=(8, 8, 4), prep="xla"),
    # wider scores tiles: w2's rows read in 256- / 512-byte runs (rank 512 at T = 32 read 64-byte runs)
    "t128_w8": SetsTuning(rows=256, cols=32, tile=128, warps=(8, 8, 4)),
    "t128_w16": SetsTuning(rows=256, cols=32, tile=128, warps=(8, 16, 4)),
    "t256_w16": SetsTuning(rows=256, cols=32, tile=256, warps=(8, 16, 4)),
}
MOSAIC_TUNINGS = {"auto": None, "r1": mm.MosaicMLPTuning(rows_per_group=1),
                  "r4_c132": mm.MosaicMLPTuning(rows_per_group=4, ctas=132),
                  "r2_c132": mm.MosaicMLPTuning(rows_per_group=2, ctas=132),
                  "r4": mm.MosaicMLPTuning(rows_per_group=4),
                  "r2_c396": mm.MosaicMLPTuning(rows_per_group=2, ctas=396),
                  "r1_pipe": mm.MosaicMLPTuning(rows_per_group=1, pipeline=True),
                  "r2_pipe": mm.MosaicMLPTuning(rows_per_group=2, pipeline=True),
                  "r1_pipe_c132": mm.MosaicMLPTuning(rows_per_group=1, ctas=132, pipeline=True),
                  # rows by TMA into a ring of shared-memory slots (one CTA an SM unless named)
                  "tma": mm.MosaicMLPTuning(tma=True),
                  "tma_s4": mm.MosaicMLPTuning(tma=True, stages=4),
                  "tma_r2": mm.MosaicMLPTuning(rows_per_group=2, tma=True),
                  "tma_c264_s4": mm.MosaicMLPTuning(tma=True, ctas=264, stages=4)}


def pieces(cfg: OPTConfig, layers, pred, *, density: float, head_keep: float, quick: bool,
           mosaic: bool = True):
    """(arrays, [(group, name, fn(arrays, layer, x [1, d]) -> array(s), weight bytes read per
    layer)]). The arrays (weights, predictors, index sets, scores) go to the jitted chain as
    arguments: captured as constants they would be copied into the compiled program."""
    d, F, H, hd = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, cfg.head_dim
    L = cfg.num_hidden_layers
    count = int(round(density * F))
    kh = max(1, math.ceil(head_keep * H))
    rng = np.random.default_rng(0)
    # a threshold's set: `count` live neurons in a cap of F (the Mosaic kernel splits the count)
    idx = jnp.asarray(np.concatenate([np.sort(rng.permutation(F)[:count]), np.zeros(F - count)]), jnp.int32)
    heads = jnp.asarray(np.sort(rng.permutation(H)[:kh]), jnp.int32)
    scores = jax.random.normal(jax.random.key(2), (L, F), F32)
    t_10 = float(np.quantile(np.asarray(scores[0]), 1 - density))
    arrays = {"layers": layers, "pred": pred, "idx": idx, "heads": heads, "scores": scores,
              "all_heads": jnp.arange(H, dtype=jnp.int32), "cache": jnp.zeros((1, H, 256, hd), jnp.bfloat16),
              "t_10": t_10}  # the sets pieces close over t_10; `sets_error` reads it here
    b = 2  # bf16 bytes
    attn = lambda a, l: a["layers"][l]["attn"]
    mlp = lambda a, l: a["layers"][l]["mlp"]
    o_in = lambda x: jnp.zeros((1, kh, hd), x.dtype) + x[:, :1, None]
    out = [
        ("glue", "glue", lambda a, l, x: x, 0),
        ("dense", "qkv_xla", lambda a, l, x: M.qkv_projection(attn(a, l), x[:, None], hd)[0], 3 * d * d * b),
        ("dense", "mlp_xla", lambda a, l, x: M.mlp(mlp(a, l), x[:, None]), 2 * F * d * b),
        # the MLP's rows of a 10% set as one dense block (the first `count` rows): what XLA's
        # GEMVs reach on the bytes the sparse MLP reads
        ("dense", "mlp_rows_xla",
         lambda a, l, x: jax.nn.relu(x @ mlp(a, l)["fc1"][:count].T) @ mlp(a, l)["fc2_t"][:count],
         2 * count * d * b),
        ("dense", "kv_slice_xla", lambda a, l, x: jnp.einsum("bd,shkd->sbhk", x, attn(a, l)["wqkv"][1:],
                                                             preferred_element_type=F32), 2 * d * d * b),
    ]
    proj = {k: v for k, v in PROJ_TUNINGS.items() if not quick or k in ("auto", "bk8")}
    for name, t in proj.items():
        out.append(("kv_all", name, lambda a, l, x, t=t: head_sparse_qkv(
            x, attn(a, l)["wqkv"], attn(a, l)["bqkv"], a["all_heads"], which=(1, 2), impl="triton",
            tuning=t, checked=False), 2 * d * d * b))
    # q of the selected heads + every head's K/V written into a 256-slot cache, one kernel
    # (what the fused decode step runs); caches are chain arguments, so each layer's update also
    # copies them (not donated): the same for every tuning
    q_kv = dict(proj, bk8_bd1024=HeadProjTuning(block_k=8, block_d=1024),
                bk4_bd1024_w8=HeadProjTuning(block_k=4, block_d=1024, num_warps=8),
                bk2=HeadProjTuning(block_k=2), bk4_w8=HeadProjTuning(block_k=4, num_warps=8))
    for name, t in q_kv.items():
        if quick and name not in ("auto", "bk8"):
            continue
        out.append(("q_kv_cache", name, lambda a, l, x, t=t: head_sparse_q_kv_update(
            x, attn(a, l)["wqkv"], attn(a, l)["bqkv"], a["heads"], a["cache"], a["cache"], 7,
            q_scale=hd**-0.5, impl="triton", tuning=t, checked=False), (2 * H + kh) * hd * d * b))
    for name, t in proj.items():
        out.append(("q_heads", name, lambda a, l, x, t=t: head_sparse_qkv(
            x, attn(a, l)["wqkv"], attn(a, l)["bqkv"], a["heads"], which=(0,), impl="triton", tuning=t,
            checked=False), kh * hd * d * b))
    for name, t in proj.items():
        out.append(("out_heads", name, lambda a, l, x, t=t: head_sparse_out(
            o_in(x), attn(a, l)["wo_t"], attn(a, l)["bo"], a["heads"], impl="triton", tuning=t,
            checked=False), kh * hd * d * b))
    mos = {k: v for k, v in MOSAIC_TUNINGS.items() if mosaic and (not quick or k in ("auto", "r1"))}
    for name, t in mos.items():
        out.append(("mlp_mosaic", name, lambda a, l, x, t=t: mm.sparse_mlp_mosaic(
            x, mlp(a, l)["fc1"], mlp(a, l)["b1"], mlp(a, l)["fc2_t"], mlp(a, l)["b2"], a["idx"], None, count,
            tuning=t), 2 * count * d * b))
    s_of = lambda a, l, x: a["scores"][l] + x[0, 0].astype(F32)
    out += [
        ("select", "scores_only", lambda a, l, x: s_of(a, l, x), 0),
        ("select", "compact_xla", lambda a, l, x: threshold_compact(s_of(a, l, x), t_10, F, impl="xla"), 0),
        ("select", "top_k_sort", lambda a, l, x: jax.lax.top_k(s_of(a, l, x), count)[1], 0),
    ]
    for w in ((4, 8, 16, 32) if not quick else (8,)):
        out.append(("select", f"compact_triton_w{w}", lambda a, l, x, w=w: threshold_compact(
            s_of(a, l, x), t_10, F, impl="triton", num_warps=w), 0))
    for name, t in (("auto", None), ("bk16", tg.GemvTuning(16, 512, 0, 4)), ("bd256", tg.GemvTuning(8, 256, 0, 4)),
                    ("w8_bd1024", tg.GemvTuning(8, 1024, 0, 8))):
        if quick and t is not None:
            continue
        kw = {"impl": "triton"} if t is None else {"impl": "triton", "tuning": t}
        out.append(("predictors", f"mlp_scores_matvec_{name}", lambda a, l, x, kw=kw: _scores(a["pred"], l, x, "mlp", kw),
                    (d * pred.rank + pred.rank * F) * b))
        out.append(("predictors", f"head_scores_matvec_{name}", lambda a, l, x, kw=kw: _scores(a["pred"], l, x, "head", kw),
                    (d * pred.head_rank + pred.head_rank * H) * b))
    out += [
        ("predictors", "mlp_scores", lambda a, l, x: predict_mlp_scores(a["pred"], l, x),
         (d * pred.rank + pred.rank * F) * b),
        ("predictors", "head_scores", lambda a, l, x: predict_head_scores(a["pred"], l, x),
         (d * pred.head_rank + pred.head_rank * H) * b),
    ]
    # a layer's batch-1 threshold sets: the XLA ops (decode_scores + select, as before
    # predict_sets) against the three predict_sets kernels and their tunings
    sets_bytes = (d * pred.rank + pred.rank * F + d * pred.head_rank + pred.head_rank * H) * b
    p_args = lambda a: ((a["pred"].mlp_w1, a["pred"].mlp_w2, a["pred"].mlp_b2),  # noqa: E731
                        (a["pred"].head_w1, a["pred"].head_w2, a["pred"].head_b2))
    out.append(("sets", "unfused", lambda a, l, x: (
        select(decode_scores(a["pred"], l, x, "head"), kh, 1)[0],
        select(decode_scores(a["pred"], l, x, "mlp"), F, 128, t_10)[:2]), sets_bytes))
    for name, t in SETS_TUNINGS.items():
        if quick and name not in ("auto", "xla_prep"):
            continue
        out.append(("sets", f"fused_{name}", lambda a, l, x, t=t: predict_sets(
            x, *p_args(a), t_10, layer=l, mlp_k=F, head_k=kh, impl="triton", tuning=t), sets_bytes))
    return arrays, out


def _scores(pred, layer, x, kind, kw):
    """`dejavu_jax.sparse.matvec_scores` of the ``kind`` predictor, with ``kw["tuning"]`` (block
    sizes and warps; each GEMV's splits from `matvec.auto_tuning`) or the auto tunings."""
    w1, w2, b2 = ((pred.mlp_w1, pred.mlp_w2, pred.mlp_b2) if kind == "mlp"
                  else (pred.head_w1, pred.head_w2, pred.head_b2))
    _, d, r = w1.shape
    t = kw.get("tuning")
    tunings = (None, None)
    if t is not None:
        t1 = tg.GemvTuning(t.block_k, min(t.block_d, r), 0, t.num_warps)
        tunings = (dataclasses.replace(t1, splits=matvec_auto(1, d, r).splits),
                   dataclasses.replace(t, splits=matvec_auto(1, r, w2.shape[2], block_d=t.block_d).splits))
    return matvec_scores(w1, w2, b2, layer, x, tunings)


MLP_TOL = 2e-2  # bf16 weights and output: max |out - ref| / max |ref|


def mlp_error(piece, arrays, x, density: float) -> float:
    """A sparse MLP piece's layer-0 output against `sparse_mlp_reference` on the same set."""
    from pallas_kernels.sparse_mlp import sparse_mlp_reference

    p = arrays["layers"][0]["mlp"]
    count = int(round(density * p["fc1"].shape[0]))
    ref = sparse_mlp_reference(x, p["fc1"], p["b1"], p["fc2_t"], p["b2"], arrays["idx"], count=count).astype(F32)
    out = jnp.asarray(piece(arrays, 0, x), F32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def sets_error(piece, arrays, x) -> list[str]:
    """A fused sets piece's layer-0 sets against `predict_sets_reference` (`sets_disagreement`:
    [] when they agree up to scores within rounding of the threshold)."""
    p = arrays["pred"]
    heads, idx, count = piece(arrays, 0, x)
    return sets_disagreement((heads, idx, count), x, (p.mlp_w1, p.mlp_w2, p.mlp_b2), (p.head_w1, p.head_w2, p.head_b2),
                             arrays["t_10"], layer=0, mlp_k=idx.shape[0], head_k=heads.shape[0], tol=3e-2)


def chain_fn(piece, L: int):
    """jit of (arrays, x) -> L layers of `piece`, layer l + 1's input depending on layer l's
    output."""
    def run(arrays, x):
        for layer in range(L):
            # every output feeds the next layer (an unused one would be dead code to XLA)
            y = sum(leaf.reshape(-1)[:1].astype(F32) for leaf in jax.tree.leaves(piece(arrays, layer, x)))
            x = (x.astype(F32) + 1e-6 * y).astype(x.dtype)
        return x
    return jax.jit(run)


def time_piece(fn, arrays, x, reps: int) -> dict:
    best = time_fn(lambda: jax.block_until_ready(fn(arrays, x)), reps=reps)
    rec = {"wall_s": best, "kernel_s": None, "kernels": None}
    if jax.devices()[0].platform == "gpu":
        from jax.experimental.mosaic.gpu import profiler
        _, timings = profiler.measure(fn, aggregate=False)(arrays, x)
        rec["kernel_s"] = sum(t for _, t in timings) * 1e-3
        rec["kernels"] = len(timings)
    return rec


def run_model(name: str, args, peak_gbps: float | None, deadline: float) -> list[dict]:
    cfg = tiny_config() if args.smoke else preset(name)
    L = args.layers or max(2, min(24, int(10e9 // layer_bytes(cfg))))
    cfg = cfg.replace(num_hidden_layers=L)
    model = M.random_model(cfg, jnp.bfloat16)
    pred = random_predictors(cfg, default_rank(cfg.hidden_size), mlp_density=args.density, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, cfg.hidden_size), jnp.bfloat16)
    recs, glue = [], None
    arrays, todo = pieces(cfg, model.params["layers"], pred, density=args.density, head_keep=args.head_keep,
                          quick=args.quick, mosaic=not args.smoke)
    for group, variant, piece, nbytes in todo:
        if args.only and group not in ("glue", "dense", *args.only.split(",")):
            continue
        if time.monotonic() > deadline:
            print(f"{name}: deadline reached, {group}/{variant} and later pieces skipped", flush=True)
            break
        if args.variants and group not in ("glue", "dense") and variant not in args.variants.split(","):
            continue
        rec = {"model": name, "layers": L, "group": group, "variant": variant, "bytes_per_layer": nbytes,
               "density": args.density, "head_keep": args.head_keep}
        try:
            if group == "mlp_mosaic":  # checked against the jnp reference before it is timed
                rec["rel_err"] = mlp_error(piece, arrays, x, args.density)
                if not rec["rel_err"] <= MLP_TOL:
                    raise ValueError(f"result differs from the reference: rel_err {rec['rel_err']:.3g} > {MLP_TOL}")
            if group == "sets" and variant.startswith("fused_"):  # so is each predict_sets tuning
                bad = sets_error(piece, arrays, x)
                if bad:
                    raise ValueError(f"sets differ from the reference: {'; '.join(bad)[:200]}")
            t = time_piece(chain_fn(piece, L), arrays, x, args.reps)
        except Exception as e:  # noqa: BLE001 - keep going; the record says what failed
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            recs.append(rec)
            print(f"{name} {group}/{variant}: {rec['error']}", flush=True)
            continue
        if group == "glue":
            glue = t
        base_k = glue["kernel_s"] if glue and glue["kernel_s"] is not None else None
        rec["wall_us"] = (t["wall_s"] - (glue["wall_s"] if glue and group != "glue" else 0)) / L * 1e6
        if t["kernel_s"] is not None:
            rec["kernel_us"] = (t["kernel_s"] - (base_k if group != "glue" else 0)) / L * 1e6
            rec["kernels_per_layer"] = (t["kernels"] - (glue["kernels"] if group != "glue" else 0)) / L
        us = rec.get("kernel_us") or rec["wall_us"]
        if nbytes and us > 0:
            rec["GBps"] = nbytes / us / 1e3
            rec["frac_of_peak"] = rec["GBps"] / peak_gbps if peak_gbps else None
        recs.append(rec)
        print(f"{name} {group:11} {variant:22} {us:8.1f} us/layer"
              + (f"  {rec['GBps']:6.0f} GB/s ({rec['frac_of_peak'] or 0:.2f} of peak)" if "GBps" in rec else ""),
              flush=True)
    del model, pred, arrays
    # the dense MLP GEMV of this shape, timed in the same chain: what XLA reaches here
    ref = next((r.get("GBps") for r in recs if r["variant"] == "mlp_xla"), None)
    for r in recs:
        if ref and "GBps" in r:
            r["frac_of_dense_gemv"] = r["GBps"] / ref
    return recs


def layer_bytes(cfg: OPTConfig) -> int:
    d, F = cfg.hidden_size, cfg.ffn_dim
    return (4 * d * d + 2 * d * F) * 2


def tiny_config() -> OPTConfig:
    return preset("opt-125m").replace(hidden_size=1024, ffn_dim=4096, num_attention_heads=8,
                                      num_hidden_layers=2, vocab_size=512)


def latest(records: list[dict]) -> list[dict]:
    """Each (model, group, variant)'s last record (a variant's " @commit" suffix aside), in
    group order: what the plot shows of a merged file."""
    last = {}
    for r in records:
        if "error" not in r:
            last[(r["model"], r["group"], r["variant"].split(" @")[0])] = r
    groups = list(dict.fromkeys(r["group"] for r in records))
    return sorted(last.values(), key=lambda r: groups.index(r["group"]))


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = latest(records)
    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 9), squeeze=False)
    colors = {}
    for ax, m in zip(axes[0], models):
        rs = [r for r in records if r["model"] == m and "error" not in r and r["group"] != "glue"]
        labels = [f"{r['group']}/{r['variant'].split(' @')[0]} @{r.get('commit', '?')}" for r in rs]
        vals = [r.get("kernel_us", r["wall_us"]) for r in rs]
        cols = [colors.setdefault(r["group"], f"C{len(colors)}") for r in rs]
        ax.barh(range(len(rs)), vals, color=cols)
        for i, r in enumerate(rs):
            if r.get("frac_of_peak"):
                ax.text(vals[i], i, f" {r['frac_of_peak']:.2f}", va="center", fontsize=7)
        ax.set_yticks(range(len(rs)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("us per layer (CUPTI kernel time; label: fraction of peak read bandwidth)")
        ax.set_title(f"{m}, B=1: per-layer pieces and tunings")
    fig.tight_layout()
    save_figure(fig, path, dpi=72)
    plt.close(fig)
    from PIL import Image  # a 32-colour palette keeps the committed plot small
    Image.open(path).convert("RGB").quantize(colors=32).save(path, optimize=True)


def table(records: list[dict]) -> str:
    lines = [f"{'model':9} {'piece':34} {'us/layer':>9} {'GB/s':>6} {'peak':>5} {'xdense':>6}"]
    for r in records:
        if "error" in r:
            lines.append(f"{r['model']:9} {r['group'] + '/' + r['variant']:34} error")
            continue
        us = r.get("kernel_us", r["wall_us"])
        gb = f"{r['GBps']:6.0f}" if "GBps" in r else "     -"
        fr = f"{r['frac_of_peak']:5.2f}" if r.get("frac_of_peak") else "    -"
        fd = f"{r['frac_of_dense_gemv']:6.2f}" if r.get("frac_of_dense_gemv") else "     -"
        lines.append(f"{r['model']:9} {r['group'] + '/' + r['variant']:34} {us:9.1f} {gb} {fr} {fd}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="opt-13b,opt-30b")
    ap.add_argument("--layers", type=int, default=0, help="layers per chain (0: ~10 GB of weights, <= 24)")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--only", default="", help="comma-separated groups to time (besides glue and dense)")
    ap.add_argument("--variants", default="", help="comma-separated variants to time (besides glue and dense)")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="stop timing pieces after this")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="two tunings per kernel")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on a tiny model")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="instead of running: join layer_kernels.json files")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    if args.smoke:
        args.models, args.quick, args.reps = "tiny", True, 1
    on_gpu = jax.devices()[0].platform == "gpu"
    peak = peak_read_bandwidth() if on_gpu else {}
    print(f"peak read bandwidth: {peak}", flush=True)
    records, deadline = [], time.monotonic() + args.deadline_s
    for name in args.models.split(","):
        records += run_model(name, args, peak.get("peak_GBps"), deadline)
    env = environment()
    for r in records:
        r.update(env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_kernels.json").write_text(dump_json({"peak": peak, **env, "records": records}))
    plot(records, out / "layer_kernels.png")
    print(table(records))


def merge(paths, out_dir) -> dict:
    """layer_kernels.json files -> one ``layer_kernels.json`` + ``.png`` under out_dir. A merged
    file (with "runs") is taken whole; a run's file adds its peak, device, jax version and
    commit to "runs", and its records with " @commit" after the variant (the first run's
    records of a merged file have none)."""
    merged = {"runs": [], "records": []}
    for p in paths:
        d = json.loads(Path(p).read_text())
        if "runs" in d:
            merged = {**d, "runs": merged["runs"] + d["runs"], "records": merged["records"] + d["records"]}
            continue
        merged["runs"].append({k: d.get(k) for k in ("peak", "device", "jax_version", "commit")})
        merged["records"] += [dict(r, variant=f"{r['variant']} @{d['commit']}") for r in d["records"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_kernels.json").write_text(dump_json(merged))
    plot(merged["records"], out / "layer_kernels.png")
    return merged


if __name__ == "__main__":
    main()
