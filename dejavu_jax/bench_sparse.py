"""Sparse vs dense decode speed on random weights in real OPT shapes (GPU).

One subprocess per model shape builds the random model once and times dense_decode and
every sparse setting asked for, with random predictors of the right shapes (the densities
are forced, so what they select does not matter for speed). ms/token excludes prefill:
(time for N new tokens - dense time for 1) / (N - 1); prefill is dense in both.
Writes ``sparse_decode.json`` (records) and ``sparse_decode.png`` (bar chart).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from dejavu_jax.bench import environment, subprocess_env, time_fn
from dejavu_jax.bench_sparse_report import (PLOT_BARS, dump_records, model_size, plot, plot_grid,  # noqa: F401
                                            plot_variants, table, variant)  # re-exported


def default_rank(d_model: int) -> int:
    """Predictor rank for speed runs: 256 up to d = 5120 (OPT-13B), 512 above (DEJAVU.md:
    256-512 suit models up to 13B; a rank-r predictor reads 5 r d weights vs 8 d^2 for the MLP)."""
    return 256 if d_model <= 5120 else 512


SPARSE_STATICS = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "sparsity", "budgets")


@contextlib.contextmanager
def patched_select(kind: str | None):
    """Trace under a `sparse.select` replacement, for ablations at batch 1: "argmax" keeps the
    predictor (its scores feed an argmax) but drops the top-k sort; "fixed" drops both (XLA
    removes the unused predictor), leaving the kernels alone. None / "top_k" / "threshold":
    the real one (a "threshold" setting's threshold travels in its SparsityConfig).
    Use with `fresh_sparse_jit` (jax caches traces per wrapped function, so an old jit would
    not retrace)."""
    import jax.numpy as jnp

    from dejavu_jax import sparse as S

    real = S.select
    if kind not in (None, "top_k", "threshold", "argmax", "fixed"):
        raise ValueError(f"unknown selection ablation {kind!r}")

    def select(scores, k, block, threshold=None, impl="auto"):
        if scores.shape[0] != 1:
            return real(scores, k, block, threshold, impl)
        n = scores.shape[1]
        idx = (jnp.arange(k, dtype=jnp.int32) * (n // k)) % n
        if kind == "argmax":
            idx = (idx + jnp.argmax(scores[0]).astype(jnp.int32)) % n
        return idx, None, None

    if kind not in (None, "top_k", "threshold"):
        S.select = select
    try:
        yield
    finally:
        S.select = real


FUSIONS = {"sets": "fused_sets", "glue": "fused_glue", "hidden": "fused_hidden", "scatter": "fused_scatter",
           "scores": "fused_scores", "mlp_sum": "fused_mlp_sum", "out_sum": "fused_out_sum",
           "boundary_sums": "boundary_sums", "mlp_boundary": "mosaic_mlp_boundary",
           "boundary_in_mlp": "boundary_in_mlp"}
# setting key -> `dejavu_jax.sparse` switch


@contextlib.contextmanager
def patched_fusion(key: str, kind: str | None):
    """Trace with one of the step's fusions off ("unfused") or as dispatched (None / "auto"),
    for same-run comparisons. key "sets": batch-1 threshold sets from the XLA ops
    (`sparse.select` of `sparse.decode_scores`, the path before `pallas_kernels.predict_sets`);
    "glue": the layer boundaries as XLA ops (residual add + LayerNorm, q / K/V projections
    and cache updates apart; `sparse.fused_glue`); "hidden": the predictors' first GEMV in
    `predict_sets`' own kernel, not in the q + K/V launch (`sparse.fused_hidden`); "scatter":
    the MLP set's scatter likewise (`sparse.fused_scatter`); "scores": the scores in their own
    kernel, not in the attention's (or out-projection's) launch (`sparse.fused_scores`); "mlp_sum" / "out_sum":
    the MLP's / out-projection's partial outputs written and summed by XLA, not added in-kernel
    into a buffer (`sparse.fused_mlp_sum` / `fused_out_sum`); "boundary_sums": those partials
    summed by XLA before the boundary kernel, not by it (`sparse.boundary_sums`); "mlp_boundary":
    the boundary before the MLP as the Triton kernel, not the Mosaic one (`sparse.mosaic_mlp_boundary`);
    "boundary_in_mlp": that boundary in its own kernel, not in the MLP's (`sparse.boundary_in_mlp`). Use with
    `fresh_sparse_jit`."""
    from dejavu_jax import sparse as S

    if key not in FUSIONS:
        raise ValueError(f"unknown fusion {key!r}; known: {sorted(FUSIONS)}")
    if kind not in (None, "auto", "unfused"):
        raise ValueError(f"unknown {key} variant {kind!r}: use 'auto' or 'unfused'")
    name = FUSIONS[key]
    real = getattr(S, name)
    if kind == "unfused":
        setattr(S, name, lambda impl, batch: False)
    try:
        yield
    finally:
        setattr(S, name, real)


@contextlib.contextmanager
def patched_fusions(kinds: dict):
    """`patched_fusion` for several keys at once: ``kinds`` maps a `FUSIONS` key to its kind."""
    with contextlib.ExitStack() as stack:
        for key, kind in kinds.items():
            stack.enter_context(patched_fusion(key, kind))
        yield


def fresh_sparse_jit():
    """A new jit of sparse decoding's loop with its own trace cache (a new function object)."""
    import jax

    from dejavu_jax import sparse as S

    def sparse_decode_loop(*args, **kwargs):
        return S._sparse_decode_jit.__wrapped__(*args, **kwargs)
    return jax.jit(sparse_decode_loop, static_argnames=SPARSE_STATICS)


def threshold_for_density(pred, config, density: float, n: int = 256, seed: int = 0) -> float:
    """A predictor-logit threshold that keeps about ``density`` of the MLP neurons of random
    predictors: the (1 - density) quantile of layer 0's scores over ``n`` random inputs. The
    predictors standardize their input, so the decode's hidden states see the same score
    distribution; the density a run actually used is in its record (used_mlp_density)."""
    import jax
    import jax.numpy as jnp

    from dejavu_jax.predictors.modules import predict_mlp_scores

    if not 0.0 < density < 1.0:
        raise ValueError(f"a threshold's target density must lie in (0, 1), got {density}.")
    x = jax.random.normal(jax.random.key(seed), (n, config.hidden_size), jnp.float32)
    return float(jnp.quantile(predict_mlp_scores(pred, 0, x), 1.0 - density))


def _jit_args(model, prompt, n, extra=None):
    """Positional args and static keywords of the decode jits, as dense_decode/sparse_decode
    build them (so a call hits the same compiled executable)."""
    import jax
    import jax.numpy as jnp

    from dejavu_jax.decode import prepare_prompt

    tokens, mask, _ = prepare_prompt(model.config, prompt, None, n)
    kw = dict(max_new_tokens=int(n), temperature=0.0, top_k=None, top_p=None, eos_token_id=None, **(extra or {}))
    return (jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0)), kw


def set_constants(constants: dict) -> None:
    """A job's ``constants`` ({"package.module.NAME": value}): module-level switches set in the
    job's subprocess before anything is traced (e.g. the grid order of the hosted programs,
    `pallas_kernels._triton_q_kv.EXTRA_PROGRAMS_FIRST`), recorded in each sparse record. JAX's
    caches are cleared after: a switch read while a kernel wrapper's own jit traces (e.g.
    `pallas_kernels.decode_attention.MAX_SEQ_SPLITS`) would otherwise keep an earlier
    setting's trace within one process."""
    import importlib

    for name, value in constants.items():
        module, _, attr = name.rpartition(".")
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            raise ValueError(f"unknown constant {name!r}: {module} has no {attr}")
        setattr(mod, attr, value)
    if constants:
        jax.clear_caches()


@contextlib.contextmanager
def constants_set(constants: dict):
    """`set_constants` for a with-block: each switch's old value is restored when it ends (a
    same-process A/B of switches that are off by default, e.g. in a GPU check)."""
    import importlib

    old = {}
    for name in constants:
        module, _, attr = name.rpartition(".")
        mod = importlib.import_module(module)
        if hasattr(mod, attr):  # else set_constants names the unknown one
            old[name] = getattr(mod, attr)
    set_constants(constants)
    try:
        yield
    finally:
        set_constants(old)


def measure_model(spec: dict) -> list[dict]:
    """Build one random model and time dense and every sparse setting of ``spec`` (printed as
    JSON lines). Each setting gets a fresh jit (a selection ablation must not reuse another's
    executable). With spec["profile"], CUPTI kernel profiles give kernels and kernel time per
    token beside the wall-clock figure."""
    import time

    import jax
    import jax.numpy as jnp

    from dejavu_jax import decode as D
    from dejavu_jax import sparse as S
    from dejavu_jax.bench_profile import kernel_profile, per_token
    from dejavu_jax.config import preset
    from dejavu_jax.model import random_model
    from dejavu_jax.predictors.modules import random_predictors

    deadline = spec.get("deadline", float("inf"))
    set_constants(spec.get("constants") or {})
    cfg = preset(spec["model"])
    if spec.get("layers"):  # a shallower model of the same width (tests, quick looks)
        cfg = cfg.replace(num_hidden_layers=int(spec["layers"]))
    t0 = time.perf_counter()
    model = random_model(cfg, jnp.bfloat16)
    jax.block_until_ready(model.params)
    print(f"# {spec['model']}: random weights in {time.perf_counter() - t0:.1f} s", flush=True)
    rank = spec.get("rank") or default_rank(cfg.hidden_size)
    n, reps, P = spec["new_tokens"], spec["reps"], spec["prompt_len"]
    profile = spec.get("profile", False)
    rng = np.random.default_rng(0)
    for batch in spec["batches"]:
        prompt = rng.integers(4, cfg.vocab_size, (batch, P), dtype=np.int32)
        a1, kw1 = _jit_args(model, prompt, 1)
        an, kwn = _jit_args(model, prompt, n)
        dense1 = lambda: D._dense_decode_jit(model, *a1, **kw1).block_until_ready()  # noqa: E731
        densen = lambda: D._dense_decode_jit(model, *an, **kwn).block_until_ready()  # noqa: E731
        t1, tn = time_fn(dense1, reps), time_fn(densen, reps)
        dense_ms = (tn - t1) / (n - 1) * 1e3
        rec = dict(batch=batch, impl="dense", mlp_density=1.0, head_keep=1.0, kv_policy="all",
                   ms_per_token=dense_ms, prefill_ms=t1 * 1e3, xla_flags=spec.get("xla_flags", ""))
        prof_1 = None
        if profile:
            try:
                prof_1 = kernel_profile(D._dense_decode_jit, model, *a1, **kw1)
                rec["profile"] = per_token(kernel_profile(D._dense_decode_jit, model, *an, **kwn), prof_1, n)
            except Exception as e:  # noqa: BLE001 - a profiler failure must not end the run
                rec["profile_error"] = repr(e)[:200]
        print(json.dumps(rec), flush=True)
        for setting in spec["settings"]:
            if batch not in setting.get("batches", spec["batches"]):
                continue
            dens, keep = setting["mlp_density"], setting["head_keep"]
            base = dict(batch=batch, impl="sparse", mlp_density=dens, head_keep=keep,
                        kv_policy=setting.get("kv_policy", "all"), batch_mode=setting.get("batch_mode", "union"),
                        kernel_impl=setting.get("impl", "auto"), lookahead=setting.get("lookahead", True),
                        selection=setting.get("selection", "top_k"), rank=rank,
                        predictor_stream=setting.get("predictor_stream", False),
                        xla_flags=spec.get("xla_flags", ""), **{key: setting.get(key, "auto") for key in FUSIONS})
            if spec.get("constants") or setting.get("constants"):  # a setting's own switches on top of the job's
                base["constants"] = {**(spec.get("constants") or {}), **(setting.get("constants") or {})}
            if time.time() > deadline:
                print(json.dumps(dict(base, error="skipped: out of time")), flush=True)
                continue
            try:
                with constants_set(setting.get("constants") or {}):  # set while traced and timed
                    by_threshold = base["selection"] == "threshold"  # ~dens kept on average, under a cap
                    cap = setting.get("cap_density", 1.0) if by_threshold else dens
                    pred = random_predictors(cfg, rank, mlp_density=cap, head_keep=keep, dtype=jnp.bfloat16,
                                             lookahead=base["lookahead"])
                    thr = threshold_for_density(pred, cfg, dens) if by_threshold else None
                    if by_threshold:
                        base.update(mlp_threshold=thr, mlp_cap_density=cap)
                    sp = S.SparsityConfig(mlp_density=cap, mlp_threshold=thr, head_keep=keep,
                                          kv_policy=base["kv_policy"], batch_mode=base["batch_mode"],
                                          impl=base["kernel_impl"], lookahead=base["lookahead"],
                                          predictor_stream=base["predictor_stream"])
                    S.check_predictors(model, pred, sp)
                    args, kw = _jit_args(model, prompt, n, dict(sparsity=sp, budgets=sp.layer_budgets(cfg, pred)))
                    fresh = fresh_sparse_jit()
                    with patched_select(base["selection"]), patched_fusions({key: base[key] for key in FUSIONS}):
                        tc = time.perf_counter()
                        _, stats = jax.block_until_ready(fresh(model, pred, *args, **kw))
                        compile_s = time.perf_counter() - tc
                    ts = time_fn(lambda: jax.block_until_ready(fresh(model, pred, *args, **kw)), max(1, reps - 1))
                    ms = (ts - t1) / (n - 1) * 1e3
                    rec = dict(base, ms_per_token=ms, compile_s=compile_s,
                               used_mlp_density=float(np.mean(stats["mlp_density"])),
                               used_head_density=float(np.mean(stats["head_density"])),
                               speedup_vs_dense=dense_ms / ms)
                    if profile and prof_1 is not None:
                        try:
                            rec["profile"] = per_token(kernel_profile(fresh, model, pred, *args, **kw), prof_1, n)
                        except Exception as e:  # noqa: BLE001
                            rec["profile_error"] = repr(e)[:200]
            except Exception as e:  # record and go on: one bad setting must not end the sweep
                rec = dict(base, error=repr(e)[:300])
            print(json.dumps(rec), flush=True)


def run_model_subprocess(spec: dict, timeout: float) -> list[dict]:
    env = subprocess_env(torch=False)
    if spec.get("xla_flags"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + spec["xla_flags"]).strip()
    try:
        proc = subprocess.run([sys.executable, "-m", "dejavu_jax.bench_sparse", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        text, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {timeout:.0f} s"
    recs = []
    for line in text.splitlines():
        if line.startswith("{"):
            recs.append(json.loads(line))
        elif line.startswith("#"):
            print(line, flush=True)
    if not recs or "timed out" in err:
        recs.append({"impl": "error", "error": (err or "no output").strip().splitlines()[-1:]})
    return recs


DEFAULT_SETTINGS = [
    dict(mlp_density=0.10, head_keep=0.50),
    dict(mlp_density=0.05, head_keep=0.50),
    dict(mlp_density=0.20, head_keep=0.50),
    dict(mlp_density=0.10, head_keep=0.25),
    dict(mlp_density=0.10, head_keep=1.00),
    dict(mlp_density=0.10, head_keep=0.50, kv_policy="selected"),
]


def _finish(recs: list[dict], model_name: str, job: dict, env: dict) -> None:
    """Add model/env facts, tokens/s and ratios against the same job's dense and HF runs."""
    dense = {r["batch"]: r["ms_per_token"] for r in recs if r.get("impl") == "dense" and "ms_per_token" in r}
    hf_ms = next((r["ms_per_token"] for r in recs if r.get("impl") == "hf_torch" and "ms_per_token" in r), None)
    for r in recs:
        r.update(model=model_name, prompt_len=job["prompt_len"], new_tokens=job["new_tokens"], **env)
        if "ms_per_token" in r:
            r["tokens_per_s"] = r["batch"] * 1e3 / r["ms_per_token"]
            if r["batch"] in dense:
                r["speedup_vs_dense"] = dense[r["batch"]] / r["ms_per_token"]
            if hf_ms and r["batch"] == 1:
                r["speedup_vs_hf_torch"] = hf_ms / r["ms_per_token"]


def run_plan(jobs: list[dict], out_dir="benchmarks/results", deadline_s: float = 3600.0,
             name: str = "sparse_decode") -> list[dict]:
    """Run ``jobs`` in order, each a dict: model, batches, settings (see DEFAULT_SETTINGS; keys
    mlp_density, head_keep, kv_policy, batch_mode, impl, lookahead, selection ("top_k",
    "threshold": a threshold calibrated to keep mlp_density on average, under cap_density,
    default 1.0; or an ablation of `patched_select`), predictor_stream, sets / glue ("unfused":
    see `patched_fusion`), batches, constants (switches set for this setting only, on top of the
    job's; see `constants_set`)), optional xla_flags, constants, profile, hf (also time HF torch eager at
    batch 1), prompt_len, new_tokens, reps, timeout. Stops starting work ``deadline_s`` from
    now; writes ``{name}.json`` after every job and ``{name}.png`` at the end."""
    import time

    from dejavu_jax.bench import run_in_subprocess

    t_end = time.time() + deadline_s
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    records: list[dict] = []
    for job in jobs:
        job = dict(dict(prompt_len=128, new_tokens=64, reps=3, timeout=420.0), **job)
        left = t_end - time.time()
        if left < 30:
            records.append(dict(model=job["model"], impl="error", error="skipped: out of time", **env))
            continue
        spec = dict(job, deadline=t_end - 20)
        t0 = time.time()
        recs = run_model_subprocess(spec, min(job["timeout"], left))
        if job.get("hf") and t_end - time.time() > 60:
            hf = run_in_subprocess(dict(impl="hf_torch", model=job["model"], batch=1, prompt_len=job["prompt_len"],
                                        new_tokens=min(job["new_tokens"], 64), reps=3),
                                   min(240.0, t_end - time.time()))
            recs.append(dict(batch=1, impl="hf_torch", mlp_density=1.0, head_keep=1.0, **hf))
        _finish(recs, job["model"], job, env)
        for r in recs:
            r["job_label"] = job.get("label", "")
        records.extend(recs)
        print(f"# job {job.get('label', job['model'])}: {time.time() - t0:.0f} s", flush=True)
        print(table(recs), flush=True)
        (out / f"{name}.json").write_text(dump_records(records))
    plot(records, out / f"{name}.png")
    return records


def run_sweep(models, batches, settings, prompt_len=128, new_tokens=128, reps=5, out_dir="benchmarks/results",
              timeout=420.0, hf_eager=True) -> list[dict]:
    jobs = [dict(model=m, batches=batches, settings=settings, prompt_len=prompt_len, new_tokens=new_tokens,
                 reps=reps, timeout=timeout, hf=hf_eager) for m in models]
    return run_plan(jobs, out_dir)


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
    p.add_argument("--plan", help="JSON file: a list of jobs for run_plan (overrides the sweep options)")
    p.add_argument("--deadline-s", type=float, default=3600.0, help="start no work after this many seconds")
    p.add_argument("--name", default="sparse_decode", help="output file stem under --out")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="instead of running: join the records of several runs' JSON into <out>/<name>.json + .png")
    p.add_argument("--variants", action="store_true",
                   help="with --merge: plot the records as same-run variants (plot_variants), no grid")
    args = p.parse_args(argv)
    if args.one:
        measure_model(json.loads(args.one))  # prints one JSON record per line
        return
    if args.merge:
        records = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(dump_records(records))
        if args.variants:
            plot_variants(records, out / f"{args.name}.png")
        else:
            plot(records, out / f"{args.name}.png")
            plot_grid(records, out / f"{args.name}_grid.png")
        print(table(records))
        return
    if args.plan:
        records = run_plan(json.loads(Path(args.plan).read_text()), args.out, args.deadline_s, args.name)
        print(table(records))
        return
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    records = run_sweep(args.models.split(","), [int(b) for b in args.batches.split(",")], settings,
                        args.prompt_len, args.new_tokens, args.reps, args.out, args.timeout, not args.no_hf)
    print(table(records))


if __name__ == "__main__":
    main()
