"""Memory plan for OPT-175B in bf16 on 4 devices (issue 9's CPU part), with 4 simulated CPU
devices: exact per-device params / predictors / KV cache (jax.eval_shape on the tp
shardings), compiled memory analysis of the tp sparse and dense decode steps and the
prefill at reduced width, extrapolated to full width (labelled), optionally one compile at
full width as a cross-check, and a tp sparse decode at reduced width whose tokens must agree
with one device. Writes benchmarks/results/opt175b_plan.json (+ .png).

    python scripts/plan_opt175b.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import sys

DEVICES = 4
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dejavu_jax.figures import save_figure  # noqa: E402

H200_GIB = 139.0


def agreement_run(width: int, layers: int) -> dict:
    """tp decode on 4 simulated devices at reduced width (f32) against one device."""
    import jax.numpy as jnp
    import numpy as np

    import dejavu_jax as dj
    from dejavu_jax import parallel as par
    from dejavu_jax.config import preset
    from dejavu_jax.model import random_model
    from dejavu_jax.parallel.plan import reduced_config
    from dejavu_jax.predictors.modules import random_predictors

    cfg = reduced_config(preset("opt-175b"), width, layers).replace(max_position_embeddings=256)
    model = random_model(cfg, jnp.float32, std=0.1, seed=0)
    pred = random_predictors(cfg, 64, block_size=128, dtype=jnp.float32)
    mesh = par.make_mesh(DEVICES)
    prompt = np.random.default_rng(0).integers(4, cfg.vocab_size, (2, 12))
    n = 16
    dense = np.asarray(dj.dense_decode(model, prompt, n))
    runs = {"tp_dense_vs_dense": (np.asarray(par.tp_dense_decode(model, prompt, n, mesh=mesh)), dense)}
    full = dj.SparsityConfig(mlp_density=1.0, head_keep=1.0)
    runs["tp_sparse_full_density_vs_dense"] = (
        np.asarray(par.tp_sparse_decode(model, pred, prompt, n, mesh=mesh, sparsity=full)), dense)
    sp = dj.SparsityConfig(mlp_density=0.1, head_keep=0.5)
    runs["tp_sparse_global_topk_vs_sparse_decode"] = (
        np.asarray(par.tp_sparse_decode(model, pred, prompt, n, mesh=mesh, sparsity=sp, selection="global")),
        np.asarray(dj.sparse_decode(model, pred, prompt, n, sparsity=sp)))
    T = prompt.shape[1]
    out = {"config": f"OPT-175B at width {width} ({cfg.num_attention_heads} heads of 128, F={cfg.ffn_dim}), "
                     f"{layers} layers, f32 random weights, batch 2, {n} new tokens, {DEVICES} devices"}
    for name, (got, ref) in runs.items():
        out[name] = {"tokens_equal": bool((got == ref).all()),
                     "new_tokens_agree_fraction": float((got[:, T:] == ref[:, T:]).mean())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1024,2048,3072")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=1024, help="prefill length (cache: --context slots)")
    ap.add_argument("--mlp-density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--rank-per-width", type=float, default=0.25,
                    help="predictor rank / d (the reference predictors: 64 / 256); the rank rule caps it at 0.1 d")
    ap.add_argument("--no-full-width", action="store_true", help="skip the full-width compile (about 40 s each)")
    ap.add_argument("--quick", action="store_true", help="two widths, batch 1, no full-width compile (tests)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.batches, args.no_full_width = "1024,2048", "1", True

    import jax.numpy as jnp

    from dejavu_jax.bench import environment
    from dejavu_jax.config import preset
    from dejavu_jax.parallel import make_mesh
    from dejavu_jax.parallel import plan as PL
    from dejavu_jax.parallel.tp_sparse import local_budgets
    from dejavu_jax.predictors.train import rank_for_width
    from dejavu_jax.sparse import SparsityConfig

    t0 = time.time()
    full = preset("opt-175b")
    mesh = make_mesh(DEVICES)
    dt = jnp.bfloat16
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(w) for w in args.widths.split(",")]
    depths = [int(x) for x in args.layers.split(",")]
    rank = rank_for_width(full.hidden_size, args.rank_per_width)
    head_rank = min(rank, full.num_attention_heads)
    sp = SparsityConfig(mlp_density=args.mlp_density, head_keep=args.head_keep)
    exact = PL.exact_plan(full, mesh, batches, args.context, rank, head_rank, dt)

    compiled, extrapolated = [], {}
    for path in ("sparse", "dense", "prefill"):
        for b in batches:
            points = {}
            for w in widths:
                for L in depths:
                    cfg = PL.reduced_config(full, w, L)
                    r = max(64, rank_for_width(w, args.rank_per_width))
                    rec = PL.compiled_step(cfg, mesh, b, args.context, path, r, min(r, cfg.num_attention_heads), dt,
                                           sp, prompt=args.prompt)
                    compiled.append({"path": path, "batch": b, "width": w, "layers": L, **rec})
                    points[(w, L)] = rec["temp_gib"]
            extrapolated[f"{path}_batch{b}"] = PL.extrapolate(points, full.hidden_size, full.num_hidden_layers)
    full_width = []
    if not args.no_full_width:
        for b in batches:
            rec = PL.compiled_step(full, mesh, b, args.context, "sparse", rank, head_rank, dt, sp)
            full_width.append({"path": "sparse", "batch": b, **rec})

    tp = DEVICES
    budgets = sp.layer_budgets(full, PL.predictor_shapes(full, rank, head_rank, dt))
    mk, hk = local_budgets(budgets, full, tp, 128)
    totals = {}
    for b in batches:
        fixed = exact["params_gib"] + exact["predictors_gib"] + exact[f"kv_cache_batch{b}_gib"]
        pallas = PL.pallas_decode_activations(full, tp, b, mk[0], hk[0])
        prefill = extrapolated[f"prefill_batch{b}"]["temp_gib"]
        xla = [extrapolated[f"sparse_batch{b}"]["temp_gib"]] + [r["temp_gib"] for r in full_width if r["batch"] == b]
        gpu_total, cpu_total = fixed + max(pallas, prefill), fixed + max(max(xla), prefill)
        totals[f"batch{b}"] = {
            "params_predictors_kv_gib": fixed,
            "gpu_pallas_path": {"decode_activations_gib_formula": pallas, "prefill_temp_gib_extrapolated": prefill,
                                "total_gib": gpu_total, "fits": gpu_total <= H200_GIB},
            "cpu_xla_upper_bound": {"decode_temp_gib": max(xla), "prefill_temp_gib_extrapolated": prefill,
                                    "total_gib": cpu_total, "fits": cpu_total <= H200_GIB},
            "device_gib": H200_GIB}
    result = {
        "what": f"OPT-175B bf16 on {DEVICES} devices: per-device memory (GiB)", **environment(),
        "device": f"cpu ({DEVICES} simulated devices)", "context": args.context, "prefill_tokens": args.prompt,
        "sparsity": {"mlp_density": args.mlp_density, "head_keep": args.head_keep, "selection": "per_device",
                     "mlp_k_per_device": mk[0], "head_k_per_device": hk[0]},
        "predictor_rank": rank, "predictor_head_rank": head_rank,
        "rank_rule": f"rank_for_width(d, {args.rank_per_width}) (cap 0.1 d, multiple of 64)",
        "exact_full_size": exact,
        "compiled_reduced_width_cpu": compiled,
        "extrapolated_full_width_cpu_xla": extrapolated,
        "compiled_full_width_cpu_xla": full_width,
        "totals": totals,
        "notes": PL.__doc__.split("\n\n", 1)[1].strip(),
    }
    result["reduced_width_decode_agreement"] = agreement_run(1024, 4 if not args.quick else 2)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "opt175b_plan.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "opt175b_plan.png")
    print(json.dumps({"exact": exact, "totals": totals,
                      "agreement": result["reduced_width_decode_agreement"]}, indent=1))
    return result


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex, tot = result["exact_full_size"], result["totals"]
    names = list(tot)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(names):
        b = name.replace("batch", "")
        parts = [("params", ex["params_gib"]), ("predictors", ex["predictors_gib"]),
                 ("KV cache", ex[f"kv_cache_batch{b}_gib"]),
                 ("activations (GPU path: prefill, extrapolated)", tot[name]["gpu_pallas_path"]["total_gib"]
                  - tot[name]["params_predictors_kv_gib"])]
        bottom = 0.0
        for j, (label, v) in enumerate(parts):
            ax.bar(i, v, 0.5, bottom=bottom, color=f"C{j}", label=label if i == 0 else None)
            bottom += v
        ax.plot([i - 0.3, i + 0.3], [tot[name]["cpu_xla_upper_bound"]["total_gib"]] * 2, "k--",
                label="with the CPU XLA path's decode temps (upper bound)" if i == 0 else None)
    ax.axhline(H200_GIB, color="r", lw=1, label=f"H200 ({H200_GIB:.0f} GiB)")
    ax.set_xticks(range(len(names)), [f"batch {n.replace('batch', '')}" for n in names])
    ax.set_ylabel("GiB per device")
    ax.set_title(f"OPT-175B bf16 over {DEVICES} devices, {result['context']}-token context")
    ax.set_ylim(0, 185)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
