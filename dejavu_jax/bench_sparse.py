"""Sparse vs dense decode speed on random weights in real OPT shapes (GPU).

One subprocess per model shape builds the random model once and times dense_decode and
every sparse setting asked for, with random predictors of the right shapes (the densities
are forced, so what they select does not matter for speed). ms/token excludes prefill:
(time for N new tokens - dense time for 1) / (N - 1); prefill is dense in both.
Writes ``sparse_decode.json`` (records) and ``sparse_decode.png`` (bar chart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from dejavu_jax.bench import environment, time_fn


def default_rank(d_model: int) -> int:
    """Predictor rank for speed runs: 256 up to d = 5120 (OPT-13B), 512 above (DEJAVU.md:
    256-512 suit models up to 13B; a rank-r predictor reads 5 r d weights vs 8 d^2 for the MLP)."""
    return 256 if d_model <= 5120 else 512


def measure_model(spec: dict) -> list[dict]:
    import jax.numpy as jnp

    from dejavu_jax.config import preset
    from dejavu_jax.decode import dense_decode
    from dejavu_jax.model import random_model
    from dejavu_jax.predictors.modules import random_predictors
    from dejavu_jax.sparse import SparsityConfig, sparse_decode

    cfg = preset(spec["model"])
    model = random_model(cfg, jnp.bfloat16)
    rank = spec.get("rank") or default_rank(cfg.hidden_size)
    n, reps, P = spec["new_tokens"], spec["reps"], spec["prompt_len"]
    rng = np.random.default_rng(0)
    out = []
    for batch in spec["batches"]:
        prompt = rng.integers(4, cfg.vocab_size, (batch, P), dtype=np.int32)
        t1 = time_fn(lambda: dense_decode(model, prompt, 1).block_until_ready(), reps)
        tn = time_fn(lambda: dense_decode(model, prompt, n).block_until_ready(), reps)
        dense_ms = (tn - t1) / (n - 1) * 1e3
        out.append(dict(batch=batch, impl="dense", mlp_density=1.0, head_keep=1.0, kv_policy="all",
                        ms_per_token=dense_ms, prefill_ms=t1 * 1e3))
        print(json.dumps(out[-1]), flush=True)
        for setting in spec["settings"]:
            if batch not in setting.get("batches", spec["batches"]):
                continue
            dens, keep = setting["mlp_density"], setting["head_keep"]
            pred = random_predictors(cfg, rank, mlp_density=dens, head_keep=keep, dtype=jnp.bfloat16)
            sp = SparsityConfig(mlp_density=dens, head_keep=keep, kv_policy=setting.get("kv_policy", "all"),
                                batch_mode=setting.get("batch_mode", "union"), impl=setting.get("impl", "auto"))
            try:
                def run():
                    return sparse_decode(model, pred, prompt, n, sparsity=sp, return_stats=True)[0].block_until_ready()
                ts = time_fn(run, max(1, reps // 2))
                _, stats = sparse_decode(model, pred, prompt, n, sparsity=sp, return_stats=True)
                ms = (ts - t1) / (n - 1) * 1e3
                rec = dict(batch=batch, impl="sparse", mlp_density=dens, head_keep=keep, kv_policy=sp.kv_policy,
                           batch_mode=sp.batch_mode, kernel_impl=sp.impl, rank=rank, ms_per_token=ms,
                           used_mlp_density=float(np.mean(stats["mlp_density"])),
                           used_head_density=float(np.mean(stats["head_density"])),
                           speedup_vs_dense=dense_ms / ms)
            except Exception as e:  # record and go on: one bad setting must not end the sweep
                rec = dict(batch=batch, impl="sparse", mlp_density=dens, head_keep=keep, error=repr(e)[:300])
            out.append(rec)
            print(json.dumps(rec), flush=True)
    return out


def run_model_subprocess(spec: dict, timeout: float) -> list[dict]:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "dejavu_jax.bench_sparse", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        text, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        text, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    recs = []
    for line in text.splitlines():
        if line.startswith("{"):
            recs.append(json.loads(line))
    if not recs:
        recs.append({"error": (err or "no output").strip().splitlines()[-1:]})
    return recs


DEFAULT_SETTINGS = [
    dict(mlp_density=0.10, head_keep=0.50),
    dict(mlp_density=0.05, head_keep=0.50),
    dict(mlp_density=0.20, head_keep=0.50),
    dict(mlp_density=0.10, head_keep=0.25),
    dict(mlp_density=0.10, head_keep=1.00),
    dict(mlp_density=0.10, head_keep=0.50, kv_policy="selected"),
]


def run_sweep(models, batches, settings, prompt_len=128, new_tokens=128, reps=5, out_dir="benchmarks/results",
              timeout=420.0, hf_eager=True) -> list[dict]:
    from dejavu_jax.bench import run_in_subprocess

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    records = []
    for model_name in models:
        spec = dict(model=model_name, batches=batches, settings=settings, prompt_len=prompt_len,
                    new_tokens=new_tokens, reps=reps)
        recs = run_model_subprocess(spec, timeout)
        if hf_eager:
            hf = run_in_subprocess(dict(impl="hf_torch", model=model_name, batch=1, prompt_len=prompt_len,
                                        new_tokens=new_tokens, reps=2), timeout)
            recs.append(dict(batch=1, impl="hf_torch", mlp_density=1.0, head_keep=1.0, **hf))
        dense = {r["batch"]: r["ms_per_token"] for r in recs if r.get("impl") == "dense" and "ms_per_token" in r}
        for r in recs:
            r.update(model=model_name, prompt_len=prompt_len, new_tokens=new_tokens, **env)
            if "ms_per_token" in r:
                r["tokens_per_s"] = r["batch"] * 1e3 / r["ms_per_token"]
                if r["batch"] in dense:
                    r["speedup_vs_dense"] = dense[r["batch"]] / r["ms_per_token"]
        hf_ms = next((r["ms_per_token"] for r in recs if r.get("impl") == "hf_torch" and "ms_per_token" in r), None)
        for r in recs:
            if hf_ms and r.get("batch") == 1 and "ms_per_token" in r:
                r["speedup_vs_hf_torch"] = hf_ms / r["ms_per_token"]
        records.extend(recs)
        (out / "sparse_decode.json").write_text(json.dumps(records, indent=1))
    plot(records, out / "sparse_decode.png")
    return records


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("batch") == 1 and "speedup_vs_dense" in r and r["impl"] == "sparse"
          and r.get("kv_policy", "all") == "all"]
    models = list(dict.fromkeys(r["model"] for r in ok))
    labels = list(dict.fromkeys(f"mlp {r['mlp_density']:.0%} / heads {r['head_keep']:.0%}" for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) * max(1, len(labels)) / 3), 4))
    w = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        vals = [next((r["speedup_vs_dense"] for r in ok if r["model"] == m and
                      f"mlp {r['mlp_density']:.0%} / heads {r['head_keep']:.0%}" == lab), 0) for m in models]
        ax.bar(np.arange(len(models)) + j * w, vals, w, label=lab)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(models)) + w * (len(labels) - 1) / 2, models)
    ax.set_ylabel("speedup vs dense_decode (batch 1)")
    ax.set_title(f"sparse_decode, random weights ({ok[0]['device'] if ok else ''})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(records) -> str:
    rows = [f"{'model':9} {'B':>3} {'impl':8} {'mlp':>5} {'head':>5} {'kv':8} {'ms/tok':>7} {'x dense':>7} {'x hf':>6}"]
    for r in records:
        if "ms_per_token" not in r:
            rows.append(f"{r.get('model', '?'):9} {r.get('batch', '?'):>3} {r.get('impl', '?'):8} error {str(r.get('error'))[:70]}")
            continue
        rows.append(f"{r['model']:9} {r['batch']:>3} {r['impl']:8} {r['mlp_density']:5.2f} {r['head_keep']:5.2f} "
                    f"{r.get('kv_policy', ''):8} {r['ms_per_token']:7.2f} {r.get('speedup_vs_dense', 0):7.2f} "
                    f"{r.get('speedup_vs_hf_torch', 0):6.2f}")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--models", default="opt-1.3b,opt-6.7b,opt-13b,opt-30b")
    p.add_argument("--batches", default="1")
    p.add_argument("--settings", default=None, help="JSON list of settings (default: DEFAULT_SETTINGS)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=420.0)
    p.add_argument("--no-hf", action="store_true", help="skip the HF torch eager peer")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.one:
        measure_model(json.loads(args.one))  # prints one JSON record per line
        return
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    records = run_sweep(args.models.split(","), [int(b) for b in args.batches.split(",")], settings,
                        args.prompt_len, args.new_tokens, args.reps, args.out, args.timeout, not args.no_hf)
    print(table(records))


if __name__ == "__main__":
    main()
