"""Multi-GPU decode benchmark: dense vs sparse, tensor-parallel on N devices vs one device.

For each model shape (random bf16 weights drawn in place on their shards), batch size and
path, one jit runs R decode steps back to back (`lax.fori_loop` feeding each step's argmax
to the next, as the decode loop does) over a KV cache of P + R slots; ms/token = its time
/ R (prefill excluded; best of ``reps``). Paths: "dense" and "sparse" (random predictors
of the model's shape at the asked densities; per-device top-k unless --selection global)
through the tp decoders on ``tp`` devices, and through the single-device `dense_decode` /
`sparse_decode` steps on one device where the model fits. Scaling efficiency =
(tokens/s on tp devices / tokens/s on one) / tp.

Each (model, devices) pair runs in its own subprocess (``--one``), so memory is returned
between them and an out-of-memory is recorded rather than ending the sweep. ``--tiny`` runs
tiny shapes on simulated CPU devices, to check the whole path without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGETS = (("opt-66b", 1, "sparse_vs_dense_on_tp", 2.5), ("opt-30b", 1, "dense_tp_vs_one", 1.7))


def _config(spec):
    from dejavu_jax.config import OPTConfig, preset

    if spec["model"] == "tiny":
        return OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=8,
                         max_position_embeddings=128)
    cfg = preset(spec["model"])
    return cfg.replace(num_hidden_layers=int(spec["layers"])) if spec.get("layers") else cfg


def _rank(d):
    from dejavu_jax.bench_sparse import default_rank
    return 8 if d < 256 else default_rank(d)


def fits_one_device(cfg, batch, cache_len, rank, dtype_bytes=2) -> tuple[bool, str]:
    """Whether params + KV cache + predictors fit in 92% of the first device's memory."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return True, "no memory limit reported"
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    need = (cfg.num_params() + 2 * L * batch * cache_len * d
            + L * (d * 2 * rank + rank * (cfg.ffn_dim + cfg.num_attention_heads))) * dtype_bytes
    return need < 0.92 * limit, f"needs ~{need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"


def _loop(step, R):
    """jit(weights, cache, tok, pos, kv_valid, slot) -> (tok, cache) after R steps; cache donated."""
    import jax
    import jax.numpy as jnp

    def run(weights, cache, tok, pos, kv_valid, slot):
        def body(i, carry):
            tok, cache = carry
            logits, cache, _ = step(weights, tok, pos + i, cache, kv_valid, slot + i)
            return jnp.argmax(logits, -1).astype(jnp.int32)[:, None], cache
        return jax.lax.fori_loop(0, R, body, (tok, cache))
    return jax.jit(run, donate_argnums=1)


def measure(spec: dict) -> list[dict]:
    """All batches and paths of one (model, devices) pair; runs in the subprocess."""
    import jax
    import jax.numpy as jnp

    from dejavu_jax import decode as D
    from dejavu_jax import sparse as S
    from dejavu_jax.bench import time_fn
    from dejavu_jax.model import init_cache
    from dejavu_jax.parallel import make_mesh, random_sharded_model, shard_predictors
    from dejavu_jax.parallel import tp_decode as TD
    from dejavu_jax.predictors.modules import random_predictors

    cfg = _config(spec)
    n_dev, P, R, reps = spec["devices"], spec["prompt_len"], spec["steps"], spec["reps"]
    dtype = jnp.float32 if spec["model"] == "tiny" else jnp.bfloat16
    rank = _rank(cfg.hidden_size)
    base = dict(model=spec["model"], layers=cfg.num_hidden_layers, devices=n_dev, prompt_len=P, steps=R)
    if n_dev == 1:
        ok, why = fits_one_device(cfg, max(spec["batches"]), P + R, rank)
        if not ok:
            return [dict(base, fits=False, reason=why)]
    mesh = make_mesh(n_dev)
    t0 = time.perf_counter()
    model = random_sharded_model(cfg, mesh, dtype)
    pred = random_predictors(cfg, rank, mlp_density=spec["mlp_density"], head_keep=spec["head_keep"],
                             block_size=8 if spec["model"] == "tiny" else 128, dtype=dtype)
    jax.block_until_ready(model.params)
    print(f"# {spec['model']} on {n_dev} device(s): weights in {time.perf_counter() - t0:.1f} s", flush=True)
    sp = S.SparsityConfig(mlp_density=spec["mlp_density"], head_keep=spec["head_keep"])
    budgets = sp.layer_budgets(cfg, pred)
    single = n_dev == 1
    if single:
        pred = jax.device_put(pred, jax.devices()[0])
    else:
        pred = shard_predictors(pred, mesh)
    records = []
    for batch in spec["batches"]:
        for path in ("dense", "sparse"):
            cache = init_cache(cfg, batch, P + R, dtype)
            if single:
                step = (functools.partial(D._dense_step, config=cfg) if path == "dense" else
                        functools.partial(S.sparse_step, config=cfg, sparsity=sp, budgets=budgets))
                cache = jax.device_put(cache, jax.devices()[0])
            else:
                cache, cspecs = TD.sharded_cache(cache, mesh)
                step = (TD.make_dense_step(cfg, mesh, cspecs) if path == "dense" else
                        TD.make_sparse_steps(cfg, mesh, cspecs, pred, sparsity=sp, budgets=budgets,
                                             selection=spec["selection"])[1])
            weights = model.params if path == "dense" else (model.params, pred)
            run = _loop(step, R)
            tok = jnp.full((batch, 1), 5, jnp.int32)
            pos = jnp.full((batch, 1), P, jnp.int32)
            kv_valid = jnp.ones((batch, P + R), bool)
            state = {"cache": cache}

            def go():
                out, state["cache"] = run(weights, state["cache"], tok, pos, kv_valid, jnp.int32(P))
                out.block_until_ready()
            try:
                t_c = time.perf_counter()
                go()
                compile_s = time.perf_counter() - t_c
                best = time_fn(go, reps, warmup=1)
            except Exception as e:  # noqa: BLE001 - recorded (e.g. out of memory), the sweep goes on
                records.append(dict(base, batch=batch, path=path, error=repr(e)[:300]))
                continue
            ms = best / R * 1e3
            rec = dict(base, batch=batch, path=path, impl="single" if single else "tp",
                       selection=None if path == "dense" else spec["selection"],
                       mlp_density=1.0 if path == "dense" else spec["mlp_density"],
                       head_keep=1.0 if path == "dense" else spec["head_keep"],
                       ms_per_token=ms, tokens_per_s=batch / best * R, first_call_s=compile_s)
            print(json.dumps(rec), flush=True)
            records.append(rec)
    return records


def run_one(spec: dict, timeout: float) -> list[dict]:
    env = dict(os.environ)
    if spec["model"] == "tiny":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                            f"{max(2, spec['devices'])} --xla_backend_optimization_level=0").strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        if spec["devices"] == 1 and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = "0"  # the one-device baseline allocates on one GPU only
    try:
        proc = subprocess.run([sys.executable, "-m", "dejavu_jax.parallel.bench", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [dict(model=spec["model"], devices=spec["devices"], error=f"timed out after {timeout} s")]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        recs.append(dict(model=spec["model"], devices=spec["devices"], error=proc.stderr.strip()[-400:]))
    return recs


def summarize(records: list[dict], tp: int) -> list[dict]:
    """Per (model, batch): sparse/dense speed-up on tp devices and the scaling efficiency."""
    ok = {(r["model"], r["batch"], r["devices"], r["path"]): r for r in records if "ms_per_token" in r}
    rows = []
    for model, batch in sorted({(m, b) for m, b, _, _ in ok}):
        row = {"model": model, "batch": batch}
        for path in ("dense", "sparse"):
            many, one = ok.get((model, batch, tp, path)), ok.get((model, batch, 1, path))
            if many:
                row[f"{path}_tokens_per_s_tp{tp}"] = many["tokens_per_s"]
            if one:
                row[f"{path}_tokens_per_s_1"] = one["tokens_per_s"]
            if many and one:
                row[f"{path}_tp_vs_one"] = many["tokens_per_s"] / one["tokens_per_s"]
                row[f"{path}_scaling_efficiency"] = row[f"{path}_tp_vs_one"] / tp
        d, s = ok.get((model, batch, tp, "dense")), ok.get((model, batch, tp, "sparse"))
        if d and s:
            row["sparse_vs_dense_on_tp"] = d["ms_per_token"] / s["ms_per_token"]
        rows.append(row)
    return rows


def targets(summary: list[dict]) -> list[dict]:
    out = []
    for model, batch, key, goal in TARGETS:
        row = next((r for r in summary if r["model"] == model and r["batch"] == batch), {})
        val = row.get(key)
        out.append({"model": model, "batch": batch, "figure": key, "target": goal, "value": val,
                    "met": None if val is None else bool(val >= goal)})
    return out


def plot(summary: list[dict], tp: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = [("dense_tokens_per_s_1", "dense, 1 device"), ("sparse_tokens_per_s_1", "sparse, 1 device"),
              (f"dense_tokens_per_s_tp{tp}", f"dense, {tp} devices"), (f"sparse_tokens_per_s_tp{tp}", f"sparse, {tp} devices")]
    labels = [f"{r['model']}\nbatch {r['batch']}" for r in summary]
    x = np.arange(len(summary))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(summary)), 4))
    for i, (key, name) in enumerate(series):
        ax.bar(x + i * w, [r.get(key, 0.0) for r in summary], w, label=name)
    ax.set_xticks(x + 0.4 - w / 2, labels)
    ax.set_ylabel("tokens / s (decode, prefill excluded)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Tensor-parallel decode (missing bar: did not fit / not run)")
    fig.tight_layout()
    from dejavu_jax.figures import save_figure

    save_figure(fig, path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="opt-30b,opt-66b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers of the same width (a slice)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--no-single", action="store_true", help="skip the one-device baseline")
    ap.add_argument("--mlp-density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--selection", default="per_device", choices=["per_device", "global"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on simulated CPU devices")
    ap.add_argument("--merge", action="store_true", help="keep other models' records of an earlier run")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.one:
        measure(json.loads(args.one))
        return
    from dejavu_jax.bench import environment

    models = ["tiny"] if args.tiny else args.models.split(",")
    common = dict(layers=args.layers, batches=[int(b) for b in args.batches.split(",")], mlp_density=args.mlp_density,
                  head_keep=args.head_keep, selection=args.selection, prompt_len=args.prompt_len,
                  steps=4 if args.tiny else args.steps, reps=1 if args.tiny else args.reps)
    records = []
    for model in models:
        for devices in ([args.tp] if args.no_single or args.tp == 1 else [args.tp, 1]):
            records += run_one(dict(common, model=model, devices=devices), args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / "multi_gpu.json"
    if args.merge and file.exists():
        old = json.loads(file.read_text())
        records = [r for r in old.get("records", []) if r.get("model") not in models] + records
    env = {"device": "cpu (simulated devices)", "jax_version": environment()["jax_version"],
           "commit": environment()["commit"]} if args.tiny else environment()
    summary = summarize(records, args.tp)
    result = {**env, "tp": args.tp, "settings": {k: v for k, v in common.items()}, "method": __doc__.split("\n\n")[1],
              "records": records, "summary": summary, "targets": targets(summary)}
    file.write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, args.tp, out / "multi_gpu.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
