"""Where does a sparse decode step spend its time? Times each piece of a layer over L unrolled
layers with distinct weights (as in decoding, so nothing stays in L2), at an OPT shape, B = 1:
dense layer pieces, predictor scores, set selection (top-k variants), head-sparse attention
pieces, the sparse MLP kernel. Prints a table (us per layer) and writes profile_layer.json.

    PYTHONPATH=. python3 scripts/profile_sparse_layer.py --model opt-13b --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.bench import environment
from dejavu_jax.config import preset
from dejavu_jax.predictors.modules import predict_mlp_scores, random_predictors
from dejavu_jax.sparse import select
from pallas_kernels.sparse_attention import head_sparse_decode_attention, head_sparse_out, head_sparse_qkv
from pallas_kernels.sparse_mlp import sparse_mlp


def bench(fn, *args, reps=20):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-13b")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    cfg = preset(args.model).replace(num_hidden_layers=args.layers)
    model = M.random_model(cfg, jnp.bfloat16)
    layers = model.params["layers"]
    L, d, F, H, hd = args.layers, cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads, cfg.head_dim
    k = int(round(args.density * F / 128)) * 128
    kh = int(np.ceil(args.head_keep * H))
    pred = random_predictors(cfg, 256 if d <= 5120 else 512, mlp_density=args.density, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (1, d), jnp.bfloat16)
    caches = [jax.random.normal(jax.random.key(i), (2, 1, H, args.seq, hd), jnp.bfloat16) for i in range(L)]
    kv_valid = jnp.ones((1, args.seq), bool)
    idx = jnp.asarray(np.random.default_rng(0).permutation(F)[:k], jnp.int32)
    heads = jnp.asarray(np.random.default_rng(1).permutation(H)[:kh], jnp.int32)
    scores = jax.random.normal(jax.random.key(2), (L, 1, F), jnp.float32)
    hscores = jax.random.normal(jax.random.key(3), (L, 1, H), jnp.float32)

    pieces = {
        "dense_mlp": lambda l, x: M.mlp(layers[l]["mlp"], x[:, None]),
        "dense_qkv": lambda l, x: M.qkv_projection(layers[l]["attn"], x[:, None], hd)[0],
        "dense_out": lambda l, x: M.out_projection(layers[l]["attn"], jnp.zeros((1, 1, H, hd), x.dtype) + x[0, :hd]),
        "layer_norm": lambda l, x: M.layer_norm(layers[l]["attn_ln"], x),
        "predictor_mlp": lambda l, x: predict_mlp_scores(pred, l, x),
        "topk_mlp_lax": lambda l, x: jax.lax.top_k(scores[l] + x[:, :1].astype(jnp.float32), k)[1],
        "topk_mlp_select": lambda l, x: select(scores[l] + x[:, :1].astype(jnp.float32), k, 128)[0],
        "topk_heads": lambda l, x: jax.lax.top_k(hscores[l] + x[:, :1].astype(jnp.float32), kh)[1],
        "threshold_nonzero": lambda l, x: jnp.nonzero((scores[l] + x[:, :1].astype(jnp.float32))[0] > 1.28, size=k)[0],
        "sparse_mlp_triton": lambda l, x: sparse_mlp(x, layers[l]["mlp"]["fc1"], layers[l]["mlp"]["b1"],
                                                     layers[l]["mlp"]["fc2_t"], layers[l]["mlp"]["b2"], idx,
                                                     impl="triton", checked=False),
        "sparse_mlp_xla": lambda l, x: sparse_mlp(x, layers[l]["mlp"]["fc1"], layers[l]["mlp"]["b1"],
                                                  layers[l]["mlp"]["fc2_t"], layers[l]["mlp"]["b2"], idx,
                                                  impl="xla", checked=False),
        "dense_kv_proj": lambda l, x: jnp.einsum("bd,shkd->sbhk", x, layers[l]["attn"]["wqkv"][1:],
                                                 preferred_element_type=jnp.float32),
        "q_sparse_triton": lambda l, x: head_sparse_qkv(x, layers[l]["attn"]["wqkv"], layers[l]["attn"]["bqkv"],
                                                        heads, which=(0,), impl="triton", checked=False),
        "attn_sparse_triton": lambda l, x: head_sparse_decode_attention(
            jnp.zeros((1, kh, hd), x.dtype) + x[:, :1, None], caches[l][0], caches[l][1], heads, kv_valid,
            impl="triton", checked=False),
        "attn_sparse_xla": lambda l, x: head_sparse_decode_attention(
            jnp.zeros((1, kh, hd), x.dtype) + x[:, :1, None], caches[l][0], caches[l][1], heads, kv_valid,
            impl="xla", checked=False),
        "out_sparse_triton": lambda l, x: head_sparse_out(jnp.zeros((1, kh, hd), x.dtype) + x[:, :1, None],
                                                          layers[l]["attn"]["wo_t"], layers[l]["attn"]["bo"],
                                                          heads, impl="triton", checked=False),
        "noop": lambda l, x: x * 2,
    }
    results = {}
    for name, piece in pieces.items():
        def run_all(x, piece=piece):
            tot = jnp.float32(0)
            for layer in range(L):
                tot = tot + jnp.sum(piece(layer, x + tot.astype(x.dtype) * 0).astype(jnp.float32))
            return tot
        try:
            t = bench(jax.jit(run_all), x)
            results[name] = t / L * 1e6
        except Exception as e:  # keep going; record what failed
            results[name] = repr(e)[:200]
        print(f"{name:22} {results[name] if isinstance(results[name], str) else f'{results[name]:9.1f} us/layer'}",
              flush=True)
    rec = dict(model=args.model, layers=L, density=args.density, head_keep=args.head_keep, k=k, head_k=kh,
               us_per_layer=results, **environment())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_layer.json").write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
