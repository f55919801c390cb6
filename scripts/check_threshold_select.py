"""GPU check of batch-1 threshold selection (issue 7): the compaction path and the Mosaic
MLP kernel's count-balanced split give the reference's answers on the GPU.

1. `sparse_mlp` (Mosaic GPU on Hopper) with a live count well under k, at the ``--model``
   width and F (k = F, as a threshold with no cap runs it), against `sparse_mlp_reference`;
2. a ``--layers``-layer f32 model of that width: `sparse_decode` with a threshold below every
   score (every neuron, found by compaction) and all heads gives `dense_decode`'s tokens,
   and a threshold calibrated to 10% uses about 10%.

Writes ``threshold_select.json`` under --out, prints one line per check; exit 1 on a failure.

    PYTHONPATH=. python3 scripts/check_threshold_select.py --out $OUT/check
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import dejavu_jax as dj
from dejavu_jax import sparse as S
from dejavu_jax.bench import environment
from dejavu_jax.bench_sparse import threshold_for_density
from dejavu_jax.config import preset
from dejavu_jax.model import random_model
from dejavu_jax.predictors.modules import random_predictors
from pallas_kernels import dispatch
from pallas_kernels import sparse_mlp as sm


def check_kernel(cfg, counts) -> list[dict]:
    d, F = cfg.hidden_size, cfg.ffn_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.bfloat16)
    w1 = jnp.asarray(rng.standard_normal((F, d)) / np.sqrt(d), jnp.bfloat16)
    w2t = jnp.asarray(rng.standard_normal((F, d)) / np.sqrt(d), jnp.bfloat16)
    b1, b2 = jnp.zeros((F,), jnp.bfloat16), jnp.asarray(rng.standard_normal(d) * 0.1, jnp.bfloat16)
    idx = jnp.asarray(rng.permutation(F), jnp.int32)
    out = []
    for count in counts:
        got = sm.sparse_mlp(x, w1, b1, w2t, b2, idx, count=jnp.int32(count), checked=False)
        ref = sm.sparse_mlp_reference(x, w1, b1, w2t, b2, idx, count=count)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) or 1.0
        out.append(dict(check="sparse_mlp count", d=d, k=F, count=int(count), backend=dispatch.backend_for("sparse_mlp"),
                        max_abs_err=err, rel_err=err / scale, ok=err / scale < 2e-2))
    return out


def check_decode(cfg, new_tokens: int) -> list[dict]:
    model = random_model(cfg, jnp.float32)
    pred = random_predictors(cfg, 256, mlp_density=1.0, head_keep=1.0, dtype=jnp.float32)
    prompt = np.random.default_rng(1).integers(4, cfg.vocab_size, (1, 16)).astype(np.int32)
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 in the dense f32 path
    dense = np.asarray(dj.dense_decode(model, prompt, new_tokens))
    sp = S.SparsityConfig(mlp_density=1.0, mlp_threshold=-1e30, head_keep=1.0)
    tokens, stats = dj.sparse_decode(model, pred, prompt, new_tokens, sparsity=sp, return_stats=True)
    recs = [dict(check="threshold below all == dense_decode", layers=cfg.num_hidden_layers,
                 same_tokens=bool((np.asarray(tokens) == dense).all()),
                 used_mlp_density=float(np.mean(stats["mlp_density"])))]
    recs[-1]["ok"] = recs[-1]["same_tokens"] and recs[-1]["used_mlp_density"] == 1.0
    t = threshold_for_density(pred, cfg, 0.1)
    _, stats = dj.sparse_decode(model, pred, prompt, new_tokens, return_stats=True,
                                sparsity=S.SparsityConfig(mlp_density=1.0, mlp_threshold=t, head_keep=0.5))
    used = float(np.mean(stats["mlp_density"]))
    recs.append(dict(check="threshold calibrated to 10%", threshold=t, used_mlp_density=used, ok=0.05 < used < 0.2))
    return recs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    cfg = preset(args.model)
    F = cfg.ffn_dim
    recs = check_kernel(cfg, [F, F // 10, F // 100 + 3, 1, 0])
    recs += check_decode(cfg.replace(num_hidden_layers=args.layers), args.new_tokens)
    env = environment()
    for r in recs:
        r.update(model=args.model, **env)
        print(json.dumps({k: v for k, v in r.items() if k not in env}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threshold_select.json").write_text(json.dumps(recs, indent=1))
    return 0 if all(r["ok"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
