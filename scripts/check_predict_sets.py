"""GPU check of `pallas_kernels.predict_sets` (issue 7): the three Triton kernels give the
reference's batch-1 sets at OPT shapes, and the decode loop that takes them still gives
dense_decode's tokens.

1. For each ``--models`` shape: random bf16 predictors of the speed runs' rank stacked over 4
   layers (the last one read, so the in-place layer offset is exercised), x with the residual
   stream's scale, thresholds keeping about 5%, 10% and 50% of the neurons, capped and not:
   `sets_disagreement` against `predict_sets_reference` must be empty;
2. `scripts/check_threshold_select.check_decode` (a 2-layer f32 model of the first shape: a
   threshold below every score gives dense_decode's tokens), now through the fused sets.

Writes ``predict_sets.json`` under --out, prints one line per check; exit 1 on a failure.

    PYTHONPATH=. python3 scripts/check_predict_sets.py --out $OUT/check
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.bench import write_checks
from dejavu_jax.bench_sparse import default_rank
from dejavu_jax.config import preset
from pallas_kernels import dispatch
from pallas_kernels import predict_sets as ps


def check_shape(name: str, layers: int = 4) -> list[dict]:
    cfg = preset(name)
    d, F, H = cfg.hidden_size, cfg.ffn_dim, cfg.num_attention_heads
    r = default_rank(d)
    key = jax.random.key(0)
    w = lambda i, shape, scale: (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)  # noqa: E731
                                 * scale).astype(jnp.bfloat16)
    mlp = (w(1, (layers, d, r), d**-0.5), w(2, (layers, r, F), r**-0.5), w(3, (layers, F), 0.5))
    head = (w(4, (layers, d, r), d**-0.5), w(5, (layers, r, H), r**-0.5), w(6, (layers, H), 0.5))
    x = w(7, (1, d), 1.0) * 4 + 0.25
    layer = layers - 1
    scores = np.asarray(ps.scores_reference(x, *mlp, layer)[0])
    out = []
    for keep in (0.05, 0.10, 0.50):
        t = float(np.quantile(scores, 1 - keep))
        for cap in (F, max(1, math.ceil(keep * F / 2))):
            kh = max(1, H // 2)
            got = ps.predict_sets(x, mlp, head, t, layer=layer, mlp_k=cap, head_k=kh, impl="triton")
            bad = ps.sets_disagreement(got, x, mlp, head, t, layer=layer, mlp_k=cap, head_k=kh, tol=3e-2)
            want = ps.predict_sets_reference(x, mlp, head, t, layer=layer, mlp_k=cap, head_k=kh)
            out.append(dict(check="predict_sets vs reference", model=name, keep=keep, cap=cap, count=int(got[2]),
                            ref_count=int(want[2]), same_heads=bool((np.asarray(got[0]) == np.asarray(want[0])).all()),
                            same_idx=bool((np.asarray(got[1]) == np.asarray(want[1])).all()), problems=bad,
                            ok=not bad))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="opt-13b,opt-30b,opt-1.3b")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    models = args.models.split(",")
    recs = [r for m in models for r in check_shape(m)]
    spec = importlib.util.spec_from_file_location("cts", Path(__file__).with_name("check_threshold_select.py"))
    cts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cts)
    recs += cts.check_decode(preset(models[0]).replace(num_hidden_layers=2), 12)
    return write_checks(recs, args.out, "predict_sets", "predict_sets",
                        backend=dispatch.backend_for("predict_sets"))

if __name__ == "__main__":
    sys.exit(main())
