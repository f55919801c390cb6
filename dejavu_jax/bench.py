"""Decode benchmarks on the GPU: dense_decode vs Hugging Face torch, with achieved bandwidth.

Every measurement runs in its own subprocess (``python -m dejavu_jax.bench --one JSON``), so
JAX's and torch's allocators never hold memory at the same time and a failure (e.g. a model
that does not fit) is recorded instead of ending the sweep. ``run_sweep`` writes
``decode.json`` (a list of records) and a plot. Timing: best of ``reps`` runs after a warm-up;
ms/token = (time for N new tokens - time for 1) / (N - 1), so prefill is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dejavu_jax.figures import save_figure


# ---- facts recorded with every figure ---------------------------------------------------------
FLOAT_DIGITS = 7  # significant digits a results file keeps of each float (timings vary in the 3rd)


def short_floats(obj, digits: int = FLOAT_DIGITS):
    """``obj`` with every float rounded to ``digits`` significant digits (nested lists / dicts)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: short_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [short_floats(v, digits) for v in obj]
    return obj


def dump_json(obj) -> str:
    """JSON text of a results file, compact but line-wise: a list, and the "records" list of a
    dict, one element a line; the dict's other keys one a line (diffs stay readable, the
    committed file small). Floats keep `FLOAT_DIGITS` significant digits."""
    obj = short_floats(obj)
    if isinstance(obj, list):
        return "[\n" + ",\n".join(json.dumps(r) for r in obj) + "\n]\n"
    if isinstance(obj, dict):
        value = lambda k, v: dump_json(v).rstrip() if k == "records" else json.dumps(v)  # noqa: E731
        parts = [f"{json.dumps(k)}: {value(k, v)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(parts) + "\n}\n"
    return json.dumps(obj) + "\n"


def environment() -> dict:
    """Device, jax version and commit. The GPU machine's copy of the tree has no .git, so the
    commit comes from $DEJAVU_COMMIT when set (scripts/gpu_run.sh sets it)."""
    import jax

    commit = os.environ.get("DEJAVU_COMMIT")
    if not commit:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=here).stdout.strip()
        commit += "-dirty" if dirty else ""
    return {"device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
            "commit": commit}


def write_checks(recs: list[dict], out_dir, name: str, title: str, **facts) -> int:
    """Tail of a GPU check script: print each record, write ``{name}.json`` (environment,
    ``facts``, records) under ``out_dir``, print the tally; exit status 0 if all are ok."""
    for r in recs:
        print(json.dumps(r), flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(dump_json(dict(environment(), **facts, records=recs)))
    print(f"{title} check: {sum(bool(r['ok']) for r in recs)}/{len(recs)} ok")
    return 0 if all(r["ok"] for r in recs) else 1


def time_fn(fn, reps: int, warmup: int = 1) -> float:
    """Best wall time (s) of ``fn()`` (which must block until the device is done)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_read_bandwidth(gib: float = 4.0, reps: int = 10) -> dict:
    """Best-of-``reps`` bf16 GEMV y = W x over a W of ``gib`` GiB: the read bandwidth a
    memory-bound decode step can hope for. Returns {"peak_GBps", "gemv_bytes", "gemv_us"}."""
    import jax
    import jax.numpy as jnp

    cols = 8192
    rows = int(gib * 2**30 / (2 * cols))
    w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.bfloat16)
    xs = [jax.random.normal(jax.random.key(i), (cols,), jnp.bfloat16) for i in range(4)]
    gemv = jax.jit(lambda w, x: jnp.dot(w, x, preferred_element_type=jnp.float32))
    it = iter(range(10**9))
    t = time_fn(lambda: gemv(w, xs[next(it) % 4]).block_until_ready(), reps=reps, warmup=2)
    nbytes = w.size * 2
    return {"peak_GBps": nbytes / t / 1e9, "gemv_bytes": nbytes, "gemv_us": t * 1e6}


def decode_bytes_per_step(config, batch: int, cache_len: int, dtype_bytes: int = 2) -> int:
    """Bytes one decode step reads: every weight once (the embedding as the LM head; one row
    of the position table) plus the K and V cache of every layer over ``cache_len`` slots."""
    d, L = config.hidden_size, config.num_hidden_layers
    weights = config.num_params() - (config.max_position_embeddings + 2) * d
    kv = 2 * L * batch * cache_len * d
    return (weights + kv) * dtype_bytes


# ---- single measurements (run in a subprocess) -------------------------------------------------
def measure_dense(model_name: str, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from dejavu_jax.decode import dense_decode
    from dejavu_jax.model import random_model

    model = random_model(model_name, jnp.bfloat16)
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, model.config.vocab_size, (batch, prompt_len), dtype=np.int32)

    def run(n):
        return lambda: dense_decode(model, prompt, n).block_until_ready()

    t1 = time_fn(run(1), reps)
    tn = time_fn(run(new_tokens), reps)
    step = (tn - t1) / (new_tokens - 1)
    cache_len = prompt_len + new_tokens
    return {"ms_per_token": step * 1e3, "prefill_ms": t1 * 1e3,
            "bytes_per_step": decode_bytes_per_step(model.config, batch, cache_len)}


def measure_hf(model_name: str, batch: int, prompt_len: int, new_tokens: int, reps: int,
               static: bool) -> dict:
    import torch
    from transformers import OPTConfig as HFConfig
    from transformers import OPTForCausalLM

    from dejavu_jax.config import preset

    cfg = preset(model_name)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        hf = OPTForCausalLM(HFConfig(**cfg.to_hf_dict()))
    hf = hf.to_empty(device="cuda").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02)
    hf.tie_weights()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(4, cfg.vocab_size, (batch, prompt_len)), device="cuda")
    extra = {"cache_implementation": "static"} if static else {}

    def run(n):
        def go():
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=1, **extra)
            torch.cuda.synchronize()
        return go

    warm = 2 if static else 1  # the static cache compiles the forward on first use
    t1 = time_fn(run(1), reps, warmup=warm)
    tn = time_fn(run(new_tokens), max(1, reps // 2), warmup=warm)
    step = (tn - t1) / (new_tokens - 1)
    return {"ms_per_token": step * 1e3, "prefill_ms": t1 * 1e3,
            "bytes_per_step": decode_bytes_per_step(cfg, batch, prompt_len + new_tokens)}


def _one(spec: dict) -> dict:
    kind = spec["impl"]
    if kind == "peak":
        return peak_read_bandwidth()
    if kind == "dense":
        return measure_dense(spec["model"], spec["batch"], spec["prompt_len"], spec["new_tokens"], spec["reps"])
    return measure_hf(spec["model"], spec["batch"], spec["prompt_len"], spec["new_tokens"], spec["reps"],
                      static=kind == "hf_torch_static")


def subprocess_env(torch: bool) -> dict:
    """Environment of a measuring subprocess. With torch in the process JAX must not take the
    GPU's memory up front. Without it JAX preallocates one region of 94%: growing on demand
    doubles the region it asks for each time and can fail on a small request near the top
    (seen at OPT-30B, batch 8: 4.1 GiB asked for a token concatenation next to 64 GB in use)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if torch:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    else:
        env.update(XLA_PYTHON_CLIENT_PREALLOCATE="true", XLA_PYTHON_CLIENT_MEM_FRACTION="0.94")
    return env


def run_in_subprocess(spec: dict, timeout: float) -> dict:
    env = subprocess_env(torch=spec["impl"].startswith("hf"))
    try:
        proc = subprocess.run([sys.executable, "-m", "dejavu_jax.bench", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1][len("RESULT "):])


# ---- the sweep ----------------------------------------------------------------------------------
def run_sweep(models, batches, impls, prompt_len=128, new_tokens=256, reps=10, out_dir="benchmarks/results",
              timeout=240.0, hf_static_models=("opt-1.3b", "opt-6.7b", "opt-13b")) -> list[dict]:
    from dejavu_jax.config import preset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    peak = run_in_subprocess({"impl": "peak"}, timeout)
    print(f"peak read bandwidth: {peak}", flush=True)
    records = []
    for model_name in models:
        for batch in batches:
            for impl in impls:
                if impl == "hf_torch_static" and (model_name not in hf_static_models or batch != 1):
                    continue
                spec = dict(impl=impl, model=model_name, batch=batch, prompt_len=prompt_len,
                            new_tokens=new_tokens, reps=reps if impl == "dense" else 3)
                res = run_in_subprocess(spec, timeout)
                rec = dict(model=model_name, batch=batch, impl=impl, prompt_len=prompt_len,
                           new_tokens=new_tokens, params=preset(model_name).num_params(), **env)
                if "error" in res:
                    rec["error"] = str(res["error"])
                else:
                    ms = res["ms_per_token"]
                    gbps = res["bytes_per_step"] / (ms * 1e-3) / 1e9
                    rec.update(res, tokens_per_s=batch * 1e3 / ms, achieved_GBps=gbps,
                               peak_GBps=peak.get("peak_GBps"),
                               frac_of_peak_bw=gbps / peak["peak_GBps"] if "peak_GBps" in peak else None)
                records.append(rec)
                print(json.dumps(rec), flush=True)
                (out / "decode.json").write_text(json.dumps(records, indent=1))
    plot_decode(records, out / "decode.png")
    return records


def plot_decode(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    batches = sorted({r["batch"] for r in ok})
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        w = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            vals = [next((r["tokens_per_s"] for r in ok if r["model"] == m and r["batch"] == b
                          and r["impl"] == impl), 0) for m in models]
            ax.bar(np.arange(len(models)) + j * w, vals, w, label=impl)
        ax.set_xticks(np.arange(len(models)) + w * (len(impls) - 1) / 2, models)
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"decode, batch {b} ({ok[0]['device'] if ok else ''})")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120, colors=32)  # flat bars
    plt.close(fig)


def table(records: list[dict]) -> str:
    rows = [f"{'model':10} {'B':>3} {'impl':16} {'ms/tok':>8} {'tok/s':>8} {'GB/s':>7} {'frac':>5}"]
    for r in records:
        if "error" in r:
            rows.append(f"{r['model']:10} {r['batch']:>3} {r['impl']:16} error: {r['error'][:60]}")
        else:
            rows.append(f"{r['model']:10} {r['batch']:>3} {r['impl']:16} {r['ms_per_token']:8.2f} "
                        f"{r['tokens_per_s']:8.1f} {r['achieved_GBps']:7.0f} {r['frac_of_peak_bw']:5.2f}")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="opt-1.3b,opt-6.7b,opt-13b,opt-30b",
                   help="comma-separated presets (random bf16 weights in real OPT shapes)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--impls", default="dense,hf_torch,hf_torch_static",
                   help="any of dense, hf_torch, hf_torch_static")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=10, help="timed runs per figure (best is kept)")
    p.add_argument("--out", default="benchmarks/results", help="directory for decode.json / decode.png")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per measurement")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help=argparse.SUPPRESS)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(_one(json.loads(args.one))), flush=True)
        return
    records = run_sweep(args.models.split(","), [int(b) for b in args.batches.split(",")],
                        args.impls.split(","), args.prompt_len, args.new_tokens, args.reps, args.out,
                        args.timeout)
    print(table(records))


if __name__ == "__main__":
    main()
