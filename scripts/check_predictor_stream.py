"""GPU check of `SparsityConfig(predictor_stream=True)` (issue 7, lookahead on a second stream):
same tokens and sets as the single-stream step, and where XLA scheduled the streamed calls.

On a random model of the ``--model`` width (``--layers`` layers, bf16, forced densities) it
decodes with and without the option and compares tokens and per-step densities, then reads
the compiled (scheduled) HLO: for every ``call-start`` of a streamed call, how many
instructions and kernels (fusions, custom calls) run between it and its ``call-done``. Zero
means XLA waits for the call right away and nothing overlaps; several means the next layer's
predictors and top-k run beside this layer's kernels. Writes ``predictor_stream.json`` under
--out and prints a summary.

    PYTHONPATH=. python3 scripts/check_predictor_stream.py --out $OUT/check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import sparse as S
from dejavu_jax.bench import environment
from dejavu_jax.bench_profile import async_overlap
from dejavu_jax.bench_sparse import _jit_args
from dejavu_jax.config import preset
from dejavu_jax.model import random_model
from dejavu_jax.predictors.modules import random_predictors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    cfg = preset(args.model).replace(num_hidden_layers=args.layers)
    model = random_model(cfg, jnp.bfloat16)
    pred = random_predictors(cfg, 256, mlp_density=0.1, head_keep=0.5, dtype=jnp.bfloat16)
    prompt = np.random.default_rng(0).integers(4, cfg.vocab_size, (1, 32)).astype(np.int32)
    pred = pred.astype(model.dtype)  # as sparse_decode passes them
    runs, texts = {}, {}
    for stream in (False, True):
        sp = S.SparsityConfig(mlp_density=0.1, head_keep=0.5, predictor_stream=stream)
        jit_args, kw = _jit_args(model, prompt, args.new_tokens,
                                 dict(sparsity=sp, budgets=sp.layer_budgets(cfg, pred)))
        # one compile per variant: its schedule is read and the same executable decodes
        compiled = S._sparse_decode_jit.lower(model, pred, *jit_args, **kw).compile()
        tokens, stats = compiled(model, pred, *jit_args)
        runs[stream] = (np.asarray(tokens), {k: np.asarray(v) for k, v in stats.items()})
        texts[stream] = compiled.as_text()
    same_tokens = bool((runs[True][0] == runs[False][0]).all())
    same_sets = all(bool((runs[True][1][k] == runs[False][1][k]).all()) for k in runs[False][1])
    calls = async_overlap(texts[True])
    rec = dict(model=args.model, layers=args.layers, new_tokens=args.new_tokens, same_tokens=same_tokens,
               same_densities=same_sets, streamed_calls=len(calls),
               stream_annotations=texts[True].count('_xla_stream_annotation="1"'),
               calls_with_overlap=sum(c["kernels_between"] > 0 for c in calls), calls=calls,
               xla_flags=os.environ.get("XLA_FLAGS", ""), **environment())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictor_stream.json").write_text(json.dumps(rec, indent=1))
    (out / "predictor_stream_hlo.txt").write_text(texts[True])
    print(f"predictor_stream check ({rec.get('device')}): same tokens {same_tokens}, same densities {same_sets}, "
          f"{len(calls)} streamed calls, {rec['calls_with_overlap']} with kernels between start and done "
          f"(kernels between: {[c['kernels_between'] for c in calls]})")
    return 0 if same_tokens and same_sets else 1


if __name__ == "__main__":
    sys.exit(main())
