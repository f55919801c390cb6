"""One sparse decode step, kernel by kernel: every GPU kernel a batch-1 step launches, in order,
with its CUPTI time, for a model of an OPT preset's width (optionally fewer layers), and the
compiled HLO of the decode loop to name what each XLA fusion computes.

The step's kernels are those of a decode of N+1 new tokens beyond those of N (the last
step's; the profiles are aligned at their common prefix and suffix). Each kernel is tagged
with its layer where the step repeats a per-layer pattern, and the per-layer pattern is
printed with its mean time per layer.

    PYTHONPATH=. python3 scripts/profile_decode_step.py --model opt-13b --layers 4 --out $OUT/step
    PYTHONPATH=. python3 scripts/profile_decode_step.py --smoke     # CPU: a tiny model, no CUPTI

Writes decode_step.json (the kernels, the per-layer pattern) and, with --hlo, the decode
loop's optimized HLO text (decode_step_hlo.txt) under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_kernels(prof_a: list[tuple[str, float]], prof_b: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The kernels of ``prof_b`` (one more decode step) not in ``prof_a``: what lies between
    their longest common prefix and suffix, by kernel family (the two programs are compiled
    apart, so XLA may number their fusions differently)."""
    from dejavu_jax.bench_profile import family

    names_a, names_b = [family(n) for n, _ in prof_a], [family(n) for n, _ in prof_b]
    pre = 0
    while pre < min(len(names_a), len(names_b)) and names_a[pre] == names_b[pre]:
        pre += 1
    suf = 0
    while (suf < min(len(names_a), len(names_b)) - pre
           and names_a[len(names_a) - 1 - suf] == names_b[len(names_b) - 1 - suf]):
        suf += 1
    return prof_b[pre:len(prof_b) - suf]


def layer_pattern(kernels: list[tuple[str, float]], layers: int) -> dict:
    """The step's per-layer pattern: the period (in kernels) at which the family sequence
    repeats ``layers - 1`` times or more covering the most kernels, and each position's mean
    time over the repeats."""
    from dejavu_jax.bench_profile import family

    fams = [family(n) for n, _ in kernels]
    best = None
    for period in range(1, len(fams) // max(1, layers - 1) + 1):
        for start in range(0, len(fams) - period):
            reps = 1
            while (start + (reps + 1) * period <= len(fams)
                   and fams[start + reps * period:start + (reps + 1) * period] == fams[start:start + period]):
                reps += 1
            if reps >= max(2, layers - 1) and (best is None or reps * period > best[2] * best[1]):
                best = (start, period, reps)  # the repeat covering the most kernels
    if best is None:
        return {}
    start, period, reps = best
    pattern = []
    for i in range(period):
        ts = [kernels[start + r * period + i][1] for r in range(reps)]
        pattern.append({"kernel": fams[start + i], "name": kernels[start + i][0], "us": 1e3 * sum(ts) / len(ts)})
    return {"start": start, "period": period, "repeats": reps, "pattern": pattern,
            "us_per_layer": sum(p["us"] for p in pattern)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-13b")
    ap.add_argument("--layers", type=int, default=4, help="layers of the model (0: the preset's)")
    ap.add_argument("--mlp-density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--kv-policy", default="all", choices=("all", "selected"))
    ap.add_argument("--selection", default="threshold", choices=("threshold", "top_k"))
    ap.add_argument("--tokens", type=int, default=8, help="N: the step profiled is the (N+1)-th token's")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--hlo", action="store_true", help="also keep the decode loop's optimized HLO")
    ap.add_argument("--smoke", action="store_true", help="CPU: a tiny model, no kernel profile")
    ap.add_argument("--out", default="benchmarks/results/raw")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dejavu_jax import sparse as S
    from dejavu_jax.bench import environment
    from dejavu_jax.bench_profile import kernel_profile
    from dejavu_jax.bench_sparse import _jit_args, default_rank, fresh_sparse_jit, threshold_for_density
    from dejavu_jax.config import OPTConfig, preset
    from dejavu_jax.model import random_model
    from dejavu_jax.predictors.modules import random_predictors

    if args.smoke:
        cfg = OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=3, ffn_dim=256,
                        num_attention_heads=4, max_position_embeddings=256)
        dtype, rank = jnp.float32, 16
    else:
        cfg = preset(args.model)
        if args.layers:
            cfg = cfg.replace(num_hidden_layers=args.layers)
        dtype, rank = jnp.bfloat16, default_rank(cfg.hidden_size)
    model = random_model(cfg, dtype)
    thr = args.selection == "threshold"
    pred = random_predictors(cfg, rank, mlp_density=1.0 if thr else args.mlp_density, head_keep=args.head_keep,
                             dtype=dtype, lookahead=True)
    sp = S.SparsityConfig(mlp_density=1.0 if thr else args.mlp_density, head_keep=args.head_keep,
                          mlp_threshold=threshold_for_density(pred, cfg, args.mlp_density) if thr else None,
                          kv_policy=args.kv_policy)
    budgets = sp.layer_budgets(cfg, pred)
    prompt = np.random.default_rng(0).integers(4, cfg.vocab_size, (1, args.prompt_len), dtype=np.int32)
    fresh = fresh_sparse_jit()
    profs = []
    for n in (args.tokens, args.tokens + 1):
        a, kw = _jit_args(model, prompt, n, dict(sparsity=sp, budgets=budgets))
        jax.block_until_ready(fresh(model, pred, *a, **kw))
        if not args.smoke:
            profs.append(kernel_profile(fresh, model, pred, *a, **kw))
    rec = dict(environment(), model=args.model, layers=cfg.num_hidden_layers, mlp_density=args.mlp_density,
               head_keep=args.head_keep, kv_policy=args.kv_policy, selection=args.selection)
    if profs:
        step = step_kernels(*profs)
        rec.update(kernels=[[n, round(t * 1e3, 3)] for n, t in step], kernels_per_step=len(step),
                   step_us=round(1e3 * sum(t for _, t in step), 2), per_layer=layer_pattern(step, cfg.num_hidden_layers))
    if args.hlo:  # the compiled (optimized, scheduled) HLO of the last jit: names every fusion
        (out / "decode_step_hlo.txt").write_text(fresh.lower(model, pred, *a, **kw).compile().as_text())
    (out / "decode_step.json").write_text(json.dumps(rec, indent=1))
    pat = rec.get("per_layer", {})
    for p in pat.get("pattern", []):
        print(f"{p['us']:8.2f} us  {p['name'][:100]}")
    if pat:
        print(f"per layer: {pat['us_per_layer']:.1f} us in {pat['period']} kernels "
              f"(x{pat['repeats']}); step {rec['step_us']:.0f} us in {rec['kernels_per_step']} kernels")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
