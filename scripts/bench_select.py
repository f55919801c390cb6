"""What a sparse decode step pays around the weight kernels, per layer (GPU, issue 7):
choosing the sets (top-k) and running the low-rank predictors, variant by variant.

Each figure is one jitted call over ``--layers`` distinct inputs (40 = OPT-13B), so the
per-layer cost includes the kernel launches XLA makes for it; best of ``--reps`` runs,
divided by the layer count. Every variant is first checked against the current one on the
GPU (same sets / same scores). Writes ``select.json`` under --out and prints a table.

    PYTHONPATH=. python3 scripts/bench_select.py --out $OUT/select
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import sparse as S
from dejavu_jax.bench import environment, time_fn
from dejavu_jax.config import preset
from dejavu_jax.predictors.modules import low_rank_scores, standardize
from pallas_kernels.select import top_k_indices, top_k_indices_reference

F32 = jnp.float32


# ---- top-k variants over [1, n] f32 scores -> [k] int32 ---------------------------------------
def topk_sort(s, k):
    return jax.lax.top_k(s, k)[1][0]


def topk_count(s, k):
    return S.top_k(s, k)[1][0]


def topk_packed(s, k):
    """One uint32 sort key: the score's order-preserving bits (high 32 - b) with the index in
    the low b bits. Equals top_k up to ties at that truncated precision."""
    n = s.shape[-1]
    b = max(1, int(np.ceil(np.log2(n))))
    bits = jax.lax.bitcast_convert_type(s[0], jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    packed = (key >> b << b) | (jnp.uint32(n - 1) - jnp.arange(n, dtype=jnp.uint32))
    top = jax.lax.sort(packed)[-k:][::-1]
    return (jnp.uint32(n - 1) - (top & jnp.uint32((1 << b) - 1))).astype(jnp.int32)


def topk_approx(s, k):
    return jax.lax.approx_max_k(s, k, recall_target=0.95)[1][0]


def compaction_only(s, k):
    """Not a top-k: the cost of `jnp.nonzero(s > t, size=k)` alone (t fixed)."""
    return jnp.nonzero(s[0] > 1.28, size=k, fill_value=0)[0].astype(jnp.int32)


def topk_select_kernel(s, k):
    """pallas_kernels.select.top_k_indices (Triton on Hopper): the set, ascending."""
    return top_k_indices(s, k)[0]


TOPK = {"lax.top_k": topk_sort, "select_kernel": topk_select_kernel, "counting": topk_count, "packed_u32_sort": topk_packed,
        "approx_max_k": topk_approx, "nonzero(s>t)": compaction_only}


def time_topk(name, n, k, layers, reps):
    fn = TOPK[name]
    scores = jax.random.normal(jax.random.key(n + k), (layers, 1, n), F32)
    chain = jax.jit(lambda s: jnp.stack([fn(s[i], k) for i in range(layers)]))
    out = np.asarray(chain(scores))
    ref = np.asarray(jax.jit(lambda s: jnp.stack([topk_sort(s[i], k) for i in range(layers)]))(scores))
    same = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(out, ref)]))
    exact = None
    if name == "select_kernel":  # the kernel's contract: exactly the reference, order included
        want = np.asarray(jax.jit(lambda s: jnp.stack([top_k_indices_reference(s[i], k)[0]
                                                      for i in range(layers)]))(scores))
        exact = bool((out == want).all())
    t = time_fn(lambda: chain(scores).block_until_ready(), reps, warmup=2)
    return {"op": "top_k", "variant": name, "n": n, "k": k, "us_per_layer": t / layers * 1e6,
            "set_overlap_with_lax_top_k": same,
            "equals_reference": exact}


# ---- predictor variants: x [1, d] -> (mlp scores [1, F], head scores [1, H]) -------------------
# Each variant gets the weights of all layers in its own layout and computes one layer's scores.
def pred_stacked(w, i, x):
    """As sparse_step does now: [L, in, out] stacks, indexed by a static layer."""
    return (low_rank_scores(w["mlp_w1"][i], w["mlp_w2"][i], w["mlp_b2"][i], x),
            low_rank_scores(w["head_w1"][i], w["head_w2"][i], w["head_b2"][i], x))


def pred_layers(w, i, x):
    """Per-layer arrays, [in, out]."""
    return pred_stacked(w[i], slice(None), x)


def pred_layers_t(w, i, x):
    """Per-layer arrays stored [out, in] (as the model's), two first-stage matmuls."""
    w = w[i]
    xn = standardize(x).astype(w["mlp_w1t"].dtype)
    hm = jnp.einsum("bd,rd->br", xn, w["mlp_w1t"], preferred_element_type=F32).astype(xn.dtype)
    hh = jnp.einsum("bd,rd->br", xn, w["head_w1t"], preferred_element_type=F32).astype(xn.dtype)
    return (jnp.einsum("br,fr->bf", hm, w["mlp_w2t"], preferred_element_type=F32) + w["mlp_b2"],
            jnp.einsum("br,hr->bh", hh, w["head_w2t"], preferred_element_type=F32) + w["head_b2"])


def pred_layers_t_cat(w, i, x):
    """[out, in] per layer, both first stages in one matmul (lookahead: both read one input)."""
    w = w[i]
    xn = standardize(x).astype(w["w1t"].dtype)
    r = w["mlp_w2t"].shape[-1]
    h = jnp.einsum("bd,rd->br", xn, w["w1t"], preferred_element_type=F32).astype(xn.dtype)
    return (jnp.einsum("br,fr->bf", h[:, :r], w["mlp_w2t"], preferred_element_type=F32) + w["mlp_b2"],
            jnp.einsum("br,hr->bh", h[:, r:], w["head_w2t"], preferred_element_type=F32) + w["head_b2"])


def _unstack(w):
    return [{n: a[i] for n, a in w.items()} for i in range(w["mlp_w1"].shape[0])]


def _transposed(w, cat):
    out = []
    for lw in _unstack(w):
        t = {"mlp_w2t": lw["mlp_w2"].T, "head_w2t": lw["head_w2"].T, "mlp_b2": lw["mlp_b2"],
             "head_b2": lw["head_b2"]}
        if cat:
            t["w1t"] = jnp.concatenate([lw["mlp_w1"].T, lw["head_w1"].T])
        else:
            t.update(mlp_w1t=lw["mlp_w1"].T, head_w1t=lw["head_w1"].T)
        out.append(t)
    return out


PRED = {"stacked [in,out]": (pred_stacked, lambda w: w), "per-layer [in,out]": (pred_layers, _unstack),
        "per-layer [out,in]": (pred_layers_t, lambda w: _transposed(w, False)),
        "per-layer [out,in]+cat": (pred_layers_t_cat, lambda w: _transposed(w, True))}


def time_predictors(name, cfg, rank, layers, reps):
    d, F, H = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads
    fn, prep = PRED[name]
    ks = jax.random.split(jax.random.key(1), 5)
    w = {"mlp_w1": 0.02 * jax.random.normal(ks[0], (layers, d, rank), jnp.bfloat16),
         "mlp_w2": 0.05 * jax.random.normal(ks[1], (layers, rank, F), jnp.bfloat16),
         "mlp_b2": jnp.zeros((layers, F), F32),
         "head_w1": 0.02 * jax.random.normal(ks[2], (layers, d, rank), jnp.bfloat16),
         "head_w2": 0.05 * jax.random.normal(ks[3], (layers, rank, H), jnp.bfloat16),
         "head_b2": jnp.zeros((layers, H), F32)}
    x = jax.random.normal(ks[4], (layers, 1, d), jnp.bfloat16)
    ref = jax.jit(lambda w, x: [pred_stacked(w, i, x[i]) for i in range(layers)])(w, x)
    w2 = jax.block_until_ready(prep(w))
    chain = jax.jit(lambda w, x: [fn(w, i, x[i]) for i in range(layers)])
    out = chain(w2, x)
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-9))
              for o, r in zip(out, ref) for a, b in zip(o, r))
    t = time_fn(lambda: jax.block_until_ready(chain(w2, x)), reps, warmup=2)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(w2))
    return {"op": "predictors", "variant": name, "d": d, "rank": rank, "F": F, "H": H,
            "us_per_layer": t / layers * 1e6, "GBps": nbytes / t / 1e9, "max_rel_err_vs_current": err}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    cfg = preset(args.model)
    F, H = cfg.ffn_dim, cfg.num_attention_heads
    env = environment()
    recs = []
    shapes = [(F, int(0.1 * F) // 128 * 128), (F, int(0.3 * F) // 128 * 128), (H, H // 2)]
    for n, k in shapes:
        for name in TOPK:
            if name == "counting" and n > 256:
                continue
            try:
                recs.append(dict(time_topk(name, n, k, args.layers, args.reps), **env))
            except Exception as e:  # noqa: BLE001 - record and go on
                recs.append(dict(op="top_k", variant=name, n=n, k=k, error=repr(e)[:300], **env))
            print(json.dumps(recs[-1]), flush=True)
    for name in PRED:
        try:
            recs.append(dict(time_predictors(name, cfg, args.rank, args.layers, args.reps), model=args.model, **env))
        except Exception as e:  # noqa: BLE001
            recs.append(dict(op="predictors", variant=name, error=repr(e)[:300], **env))
        print(json.dumps(recs[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "select.json").write_text(json.dumps(recs, indent=1))
    print(f"{'op':11} {'variant':20} {'shape':>14} {'us/layer':>9} {'check':>8}")
    for r in recs:
        shape = f"{r.get('n', r.get('d'))}/{r.get('k', r.get('rank'))}"
        check = r.get("max_rel_err_vs_current", r.get("set_overlap_with_lax_top_k", float("nan")))
        if r.get("equals_reference") is not None:  # the kernel: exact equality with its reference
            check = float(r["equals_reference"])
        us = r.get("us_per_layer")
        print(f"{r['op']:11} {r['variant']:20} {shape:>14} "
              + (f"{us:9.2f} {check:8.4f}" if us is not None else "error: " + r["error"][:60]))


if __name__ == "__main__":
    main()
