"""One sparse decode step, kernel by kernel: every GPU kernel a batch-1 step launches, in order,
with its CUPTI time, for a model of an OPT preset's width (optionally fewer layers), and the
compiled HLO of the decode loop to name what each XLA fusion computes.

A step's kernel count and time are those of a decode of N+1 new tokens minus those of N.
The kernels kept are the N+1 profile's past its common prefix and suffix with the N one (the
last step; more where the two programs' prefill kernels differ), and the per-layer pattern of
the last step is found in them and printed with its mean time per layer.

    PYTHONPATH=. python3 scripts/profile_decode_step.py --model opt-13b --layers 4 --out $OUT/step
    PYTHONPATH=. python3 scripts/profile_decode_step.py --smoke     # CPU: a tiny model, no CUPTI
    python3 scripts/profile_decode_step.py --merge a/decode_step.json b/... --out benchmarks/results

Writes decode_step.json (the kernels, the per-layer pattern) and, with --hlo, the decode
loop's optimized HLO text (decode_step_hlo.txt) under --out; --merge gathers several runs
into one decode_step.json with a plot of a layer's time by kernel group (decode_step.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_kernels(prof_a: list[tuple[str, float]], prof_b: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The kernels of ``prof_b`` (one more decode step) not in ``prof_a``: what lies between
    their longest common prefix and suffix, by kernel family (the two programs are compiled
    apart, so XLA may number their fusions differently). Where the prefills differ (their
    cache lengths do), that is more than one step."""
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
    """The per-layer pattern of the profile's last decode step: of the runs in which a family
    sequence of 2 kernels or more repeats ``layers - 1`` or ``layers`` times in a row, the one
    that starts last (the decode loop ends the profile; a prefill's layers or a run of whole
    steps start earlier), the shorter period on a tie; each position's mean time over the
    repeats."""
    from dejavu_jax.bench_profile import family

    fams = [family(n) for n, _ in kernels]
    lo = max(2, layers - 1)

    def reps_at(start, period):
        reps = 1
        while (start + (reps + 1) * period <= len(fams)
               and fams[start + reps * period:start + (reps + 1) * period] == fams[start:start + period]):
            reps += 1
        return reps

    best = None  # (last start, -period, start, reps)
    for period in range(2, len(fams) // lo + 1):
        last = next((st for st in range(len(fams) - lo * period, -1, -1) if lo <= reps_at(st, period) <= layers), None)
        if last is None or (best is not None and (last, -period) <= best[:2]):
            continue
        # of the starts up to `layers` periods earlier (the run's start, its rotations), the one
        # repeating most (the latest on a tie)
        reps, start = max((reps_at(st, period), st) for st in range(max(0, last - layers * period), last + 1)
                          if reps_at(st, period) <= layers)
        best = (last, -period, start, reps)
    if best is None:
        return {}
    period, start, reps = -best[1], best[2], best[3]
    pattern = []
    for i in range(period):
        ts = [kernels[start + r * period + i][1] for r in range(reps)]
        pattern.append({"kernel": fams[start + i], "name": kernels[start + i][0], "us": 1e3 * sum(ts) / len(ts)})
    return {"start": start, "period": period, "repeats": reps, "pattern": pattern,
            "us_per_layer": sum(p["us"] for p in pattern)}


GROUPS = (  # (label, kernel families) for the plot; a family ending in "*" matches as a prefix
    ("weights: q + K/V (+ cache)", ("dejavu_q_kv_cache*", "dejavu_gather_matvec_")),
    ("weights: Q", ("dejavu_gather_matvec",)),
    ("weights: out-projection", ("dejavu_gather_matvec_t",)),
    ("weights: MLP", ("anonymous_mosaic_gpu_kernel", "dejavu_fused_mlp", "dejavu_boundary_mlp*")),
    ("sets (predict_sets)", ("dejavu_sets*",)),
    ("attention", ("dejavu_head_sparse_decode_attention",)),
    ("residual + LayerNorm kernel", ("dejavu_add_layer_norm*",)),
)
GLUE = "XLA glue (LayerNorms, sums, casts, cache updates)"


def group_of(kernel: str) -> str:
    for g, fams in GROUPS:
        if any(kernel == f or (f.endswith("*") and kernel.startswith(f[:-1])) for f in fams):
            return g
    return GLUE


def merge(paths, out_dir) -> dict:
    """decode_step.json files -> one ``decode_step.json`` (records, per-layer patterns recomputed)
    and ``decode_step.png`` (a layer's kernel time by group, one bar per record) under out_dir."""
    from dejavu_jax.bench import dump_json

    recs = []
    for p in paths:
        r = json.loads(Path(p).read_text())
        # runs before step_kernel_us summed `kernels` as one step, which is more where the
        # prefills differ: those figures are dropped, not carried over
        for stale in ("step_us", "kernels_per_step"):
            r.pop(stale, None)
        r["per_layer"] = layer_pattern([(n, t / 1e3) for n, t in r.get("kernels", [])], r["layers"])
        recs.append(r)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(dump_json({"records": recs}))
    plot(recs, out / "decode_step.png")
    return {"records": recs}


def plot(recs, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} {r['kv_policy']} K/V, {r['mlp_density']:.0%}/{r['head_keep']:.0%} ({r['commit'][:7]})"
              + "".join(f"\n+ {k.rpartition('.')[2]}" for k, v in sorted(r.get("constants", {}).items()) if v)
              for r in recs]
    groups = [g for g, _ in GROUPS] + [GLUE]
    fig, ax = plt.subplots(figsize=(9, 2.2 + 0.5 * len(recs)))
    left = [0.0] * len(recs)
    for i, g in enumerate(groups):
        vals = [sum(p["us"] for p in r["per_layer"].get("pattern", []) if group_of(p["kernel"]) == g) for r in recs]
        ax.barh(labels, vals, left=left, color=f"C{i}", label=g)
        left = [a + b for a, b in zip(left, vals)]
    for y, (r, total) in enumerate(zip(recs, left)):
        n = r["per_layer"].get("period", 0)
        ax.text(total + 1, y, f"{total:.0f} us, {n} kernels", va="center", fontsize=8)
    ax.set_xlabel("GPU time of one decode layer (us, CUPTI), batch 1, threshold sets")
    ax.set_xlim(0, max(left) * 1.25)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.45, -0.22), ncol=3)
    ax.set_title("One sparse decode layer, kernel by kernel (scripts/profile_decode_step.py)", fontsize=9)
    fig.tight_layout()
    from dejavu_jax.figures import save_figure

    save_figure(fig, path, dpi=100)
    plt.close(fig)
    from PIL import Image  # a few flat colours: keep the committed plot small
    Image.open(path).convert("RGB").quantize(colors=32).save(path, optimize=True)


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
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge decode_step.json files into --out and plot")
    args = ap.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dejavu_jax import sparse as S
    from dejavu_jax.bench import dump_json, environment
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
        a, b = profs
        rec.update(kernels=[[n, round(t * 1e3, 3)] for n, t in step], step_kernel_count=len(b) - len(a),
                   step_kernel_us=round(1e3 * (sum(t for _, t in b) - sum(t for _, t in a)), 2),
                   per_layer=layer_pattern(step, cfg.num_hidden_layers))
    if args.hlo:  # the compiled (optimized, scheduled) HLO of the last jit: names every fusion
        (out / "decode_step_hlo.txt").write_text(fresh.lower(model, pred, *a, **kw).compile().as_text())
    (out / "decode_step.json").write_text(dump_json(rec))
    pat = rec.get("per_layer", {})
    for p in pat.get("pattern", []):
        print(f"{p['us']:8.2f} us  {p['name'][:100]}")
    if pat:
        print(f"per layer: {pat['us_per_layer']:.1f} us in {pat['period']} kernels "
              f"(x{pat['repeats']}); step {rec['step_kernel_us']:.0f} us in {rec['step_kernel_count']} kernels")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
