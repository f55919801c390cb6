"""Benchmark the dejavu-jax Pallas kernels on a GPU (issue 4).

1. correctness of every backend/variant against the f32 reference, on the GPU;
2. peak read bandwidth: best of >= 10 timed bf16 GEMVs over a >= 4 GiB matrix;
3. the sweep: sparse MLP over d_model x density x batch (pallas / xla_gather / dense),
   head-sparse projections and decode attention over heads kept;
4. JSON records + plots under --out, and a short table printed last.

Timing: each measurement is a jitted chain of N calls on distinct inputs (different x
and index sets, weights rotated over enough copies that the 50 MB L2 holds none of
them), dispatched back to back, median over repetitions, divided by N. Inputs are random
normal, never zeros. `--explore` times tuning variants on a few key shapes instead.

    PYTHONPATH=. python3 scripts/bench_kernels.py --out $OUT [--explore] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_gpu_dot_merger_threshold_mb=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dejavu_jax.bench import dump_json  # noqa: E402
from pallas_kernels import dispatch  # noqa: E402
from pallas_kernels import sparse_attention as sa  # noqa: E402
from pallas_kernels import sparse_mlp as sm  # noqa: E402
import bench_kernels_check  # noqa: E402
from bench_kernels_check import L2_BYTES, MLPInputs, check_correctness  # noqa: E402
from bench_kernels_report import LOG, log, merge, plots, summary  # noqa: E402
from bench_kernels_variants import (  # noqa: E402
    correctness_variants, default_variants, explore_variants, mosaic_variants)

# Overridden by --smoke (a CPU dry run of the whole script on tiny shapes), with
# bench_kernels_check's CHECK_MLP / CHECK_ATTN.
PEAK_SHAPE = (262144, 8192)  # 4 GiB of bf16


# ----------------------------------------------------------------------------- timing


CUPTI_OK = [True]


def time_chain(call, arrays, n_inputs, *, est_s=20e-6, target_s=0.003, max_n=32, reps=5):
  """Median seconds per call of a chain out_i = call(arrays, i, out_{i-1}) over distinct
  inputs i; each call feeds the next (as layers do), so XLA can neither merge nor reorder
  them. `arrays` (a pytree) is passed as jit arguments, never captured as constants.
  Returns (seconds per call, chain length, kernel-only seconds per call or None,
  kernels per call or None); the kernel-only time is the CUPTI sum of kernel durations."""
  n = int(min(max_n, n_inputs, max(8, target_s / est_s)))

  def chain(arrs):
    out, outs = None, []
    for i in range(n):
      out = call(arrs, i, out)
      outs.append(out)
    return outs
  f = jax.jit(chain)
  jax.block_until_ready(f(arrays))
  jax.block_until_ready(f(arrays))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [f(arrays) for _ in range(3)]  # back to back: the host stays ahead of the GPU
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) / (3 * n))
  kernel_s = kernels = None
  if CUPTI_OK[0]:
    try:
      from jax.experimental.mosaic.gpu import profiler
      _, timings = profiler.measure(f, aggregate=False)(arrays)
      kernel_s = sum(t for _, t in timings) * 1e-3 / n
      kernels = len(timings) / n
    except Exception as e:  # noqa: BLE001
      CUPTI_OK[0] = False
      log(f"  (CUPTI kernel timing unavailable: {type(e).__name__}: {str(e)[:200]})")
  return statistics.median(times), n, kernel_s, kernels


def feed(prev, x, scale=1e-3):
  """x + scale * prev, with prev flattened per batch row and cut/padded to x's size."""
  if prev is None:
    return x
  b = x.shape[0]
  flat = prev.reshape(b, -1).astype(jnp.float32)
  n = int(np.prod(x.shape[1:]))
  flat = flat[:, :n] if flat.shape[1] >= n else jnp.pad(flat, ((0, 0), (0, n - flat.shape[1])))
  return (x.astype(jnp.float32) + scale * flat.reshape(x.shape)).astype(x.dtype)


def peak_read_bandwidth(reps=6, chain=8):
  """Best of `reps` timings of a chain of `chain` dependent bf16 GEMVs over a 4 GiB
  [262144, 8192] matrix (>= 10 GEMVs timed in all) -> GB/s."""
  rows, cols = PEAK_SHAPE
  w = jax.random.normal(jax.random.key(1), (rows, cols), jnp.bfloat16)
  x = jax.random.normal(jax.random.key(2), (cols,), jnp.bfloat16)

  @jax.jit
  def f(w, x):
    for _ in range(chain):
      y = w @ x
      x = (x + 1e-3 * y[:cols]).astype(x.dtype)
    return x
  jax.block_until_ready(f(w, x))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(w, x))
    best = min(best, (time.perf_counter() - t0) / chain)
  nbytes = rows * cols * 2
  del w
  return nbytes / best / 1e9, best


# ----------------------------------------------------------------------------- inputs


def mlp_call(inp: MLPInputs, impl, batch, k, tuning=None, n=48, mosaic_tuning=None):
  """(call, arrays): call(arrays, i) runs the i-th input set through `impl`."""
  xs, idx = inp.xs_idx(batch, k, n)
  arrays = (inp.sets, xs, idx)

  def call(arrs, i, prev):
    sets, xs, idx = arrs
    w1, b1, w2t, b2 = sets[i % len(sets)]
    x = feed(prev, xs[i])  # residual-style: this layer's input depends on the last output
    if impl == "dense":
      h = jnp.maximum(jnp.dot(x, w1.T, preferred_element_type=jnp.float32) + b1, 0)
      return (jnp.dot(h.astype(w1.dtype), w2t, preferred_element_type=jnp.float32) + b2
              ).astype(x.dtype)
    if impl == "mosaic":
      return sm.sparse_mlp(x, w1, b1, w2t, b2, idx[i], impl="mosaic", tuning=mosaic_tuning,
                           checked=False)
    return sm.sparse_mlp(x, w1, b1, w2t, b2, idx[i], impl=impl, tuning=tuning,
                         checked=False)
  return call, arrays


# ----------------------------------------------------------------------------- correctness


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Ctx:
  peak_gbps: float
  device: str
  jax_version: str
  commit: str
  records: list
  out_dir: str
  deadline: float

  def add(self, **r):
    nbytes = r["bytes_read"]
    us = r["us"]
    r.setdefault("variant", r["impl"])
    r.update(
        eff_GBps=nbytes / (us * 1e-6) / 1e9,
        frac_of_peak_bw=nbytes / (us * 1e-6) / 1e9 / self.peak_gbps,
        fixed_us=us - nbytes / (self.peak_gbps * 1e9) * 1e6,
        device=self.device, jax_version=self.jax_version, commit=self.commit)
    self.records.append(r)
    with open(os.path.join(self.out_dir, "kernels.json"), "w") as f:
      f.write(dump_json({"peak_read_GBps": self.peak_gbps, "records": self.records}))
    return r

  def time_left(self):
    return self.deadline - time.time()


def timed(ctx, label, call_arrays, n, **rec):
  call, arrays = call_arrays
  try:
    est = rec["bytes_read"] / (ctx.peak_gbps * 1e9) + 8e-6
    sec, used, kernel_s, kernels = time_chain(call, arrays, n, est_s=est)
  except Exception as e:  # noqa: BLE001
    log(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if os.environ.get("BENCH_TRACEBACK"):
      traceback.print_exc()
    return None
  extra = {}
  if kernel_s is not None:
    extra = dict(kernel_us=kernel_s * 1e6, kernels_per_call=kernels)
  r = ctx.add(us=sec * 1e6, n_chain=used, **extra, **rec)
  kinfo = (f"  kernels {r['kernel_us']:7.1f} us / {r['kernels_per_call']:.0f}"
           if kernel_s is not None else "")
  log(f"  {label:48s} {r['us']:8.1f} us {r['eff_GBps']:6.0f} GB/s "
      f"{r['frac_of_peak_bw']:.2f} peak  fixed {r['fixed_us']:6.1f} us{kinfo}")
  return r


CHECK_NAME = {"triton": "triton-auto", "mosaic": "mosaic"}
FAILED_CHECK: set[str] = set()


def bench_mlp(ctx, d_models, densities, batches, variants):
  for d in d_models:
    if ctx.time_left() < 30:
      log(f"budget: skipping d={d} and later")
      break
    inp = MLPInputs(d)
    itemsize = 2
    for b in batches:
      dense_bytes = 2 * inp.d_ff * d * itemsize
      rd = timed(ctx, f"dense d={d} B={b}", mlp_call(inp, "dense", b, 1), 48,
                 op="sparse_mlp", d_model=d, d_ff=inp.d_ff, density=1.0, batch=b,
                 impl="dense", bytes_read=dense_bytes)
      for dens in densities:
        if ctx.time_left() < 20:
          break
        k = max(1, int(round(dens * inp.d_ff)))
        nbytes = 2 * k * d * itemsize
        common = dict(op="sparse_mlp", d_model=d, d_ff=inp.d_ff, density=dens, batch=b,
                      bytes_read=nbytes)
        rx = timed(ctx, f"xla_gather d={d} dens={dens} B={b}", mlp_call(inp, "xla", b, k),
                   48, impl="xla_gather", **common)
        for vname, (impl, tuning, mt) in variants(b).items():
          if ctx.time_left() < 15:
            log(f"budget: skipping {vname} d={d} dens={dens} B={b}")
            continue
          if CHECK_NAME.get(vname, vname) in FAILED_CHECK:
            continue  # failed the correctness check on this GPU: not timed
          rp = timed(ctx, f"{vname} d={d} dens={dens} B={b}",
                     mlp_call(inp, impl, b, k, tuning=tuning, mosaic_tuning=mt), 48,
                     impl="pallas", variant=vname, **common)
          if rp and rd:
            rp["speedup_vs_dense"] = rd["us"] / rp["us"]
          if rp and rx:
            rp["speedup_vs_xla_gather"] = rx["us"] / rp["us"]
    del inp


def bench_attention(ctx, d_models, keeps, batches, seq=2048):
  """Head-sparse QKV / out projections and decode attention vs dense and XLA gather."""
  for d in d_models:
    if ctx.time_left() < 20:
      break
    n_heads, hd = d // 128, 128
    n_sets = max(2, min(8, math.ceil(6 * L2_BYTES / (4 * d * d * 2))))
    key = jax.random.key(d + 1)
    wq = [(jax.random.normal(jax.random.fold_in(key, s), (3, n_heads, hd, d)) /
           math.sqrt(d)).astype(jnp.bfloat16) for s in range(n_sets)]
    wo = [(jax.random.normal(jax.random.fold_in(key, 100 + s), (n_heads, hd, d)) /
           math.sqrt(d)).astype(jnp.bfloat16) for s in range(n_sets)]
    rng = np.random.default_rng(d)
    for b in batches:
      xs = [jnp.asarray(rng.standard_normal((b, d)), jnp.bfloat16) for _ in range(48)]
      base = dict(d_model=d, d_ff=4 * d, batch=b)
      dq = timed(ctx, f"qkv dense d={d} B={b}",
                 (lambda a, i, p: jnp.dot(feed(p, a[0][i]),
                                          a[1][i % len(a[1])].reshape(3 * d, d).T),
                  (xs, wq)), 48,
                 op="head_sparse_qkv", impl="dense", bytes_read=3 * d * d * 2, density=1.0,
                 **base)
      do = timed(ctx, f"out dense d={d} B={b}",
                 (lambda a, i, p: jnp.dot(feed(p, a[0][i]), a[1][i % len(a[1])].reshape(d, d)),
                  (xs, wo)), 48,
                 op="head_sparse_out", impl="dense", bytes_read=d * d * 2, density=1.0, **base)
      for keep in keeps:
        if ctx.time_left() < 20:
          break
        k_h = max(1, int(round(keep * n_heads)))
        heads = [jnp.asarray(rng.permutation(n_heads)[:k_h], jnp.int32) for _ in range(48)]
        os_ = [jnp.asarray(rng.standard_normal((b, k_h, hd)), jnp.bfloat16) for _ in range(48)]
        for impl in ("triton", "xla"):
          tag = "pallas" if impl == "triton" else "xla_gather"
          r = timed(ctx, f"qkv {impl} d={d} keep={keep} B={b}",
                    (lambda a, i, p, impl=impl: sa.head_sparse_qkv(
                        feed(p, a[0][i]), a[1][i % len(a[1])], None, a[2][i], impl=impl,
                        checked=False),
                     (xs, wq, heads)), 48,
                    op="head_sparse_qkv", impl=tag, variant=impl, density=keep,
                    bytes_read=3 * k_h * hd * d * 2, **base)
          if r and dq:
            r["speedup_vs_dense"] = dq["us"] / r["us"]
          r = timed(ctx, f"out {impl} d={d} keep={keep} B={b}",
                    (lambda a, i, p, impl=impl: sa.head_sparse_out(
                        feed(p, a[0][i]), a[1][i % len(a[1])], None, a[2][i], impl=impl,
                        checked=False),
                     (os_, wo, heads)), 48,
                    op="head_sparse_out", impl=tag, variant=impl, density=keep,
                    bytes_read=k_h * hd * d * 2, **base)
          if r and do:
            r["speedup_vs_dense"] = do["us"] / r["us"]
    # decode attention over the selected heads' KV cache
    for b in batches:
      if ctx.time_left() < 20:
        break
      kc = [jax.random.normal(jax.random.fold_in(key, 200 + s), (b, n_heads, seq, hd),
                              jnp.bfloat16) for s in range(2)]
      vc = [jax.random.normal(jax.random.fold_in(key, 300 + s), (b, n_heads, seq, hd),
                              jnp.bfloat16) for s in range(2)]
      kvm = jnp.asarray(rng.random((b, seq)) < 0.9)
      for keep in keeps:
        k_h = max(1, int(round(keep * n_heads)))
        heads = [jnp.asarray(rng.permutation(n_heads)[:k_h], jnp.int32) for _ in range(48)]
        qs = [jnp.asarray(rng.standard_normal((b, k_h, hd)) / 11.3, jnp.bfloat16)
              for _ in range(48)]
        for impl in ("triton", "xla"):
          timed(ctx, f"attn {impl} d={d} keep={keep} B={b} S={seq}",
                (lambda a, i, p, impl=impl: sa.head_sparse_decode_attention(
                    feed(p, a[0][i]), a[1][i % 2], a[2][i % 2], a[3][i], a[4], impl=impl,
                    checked=False), (qs, kc, vc, heads, kvm)), 48,
                op="head_sparse_decode_attention", d_model=d, d_ff=4 * d, density=keep,
                batch=b, impl="pallas" if impl == "triton" else "xla_gather", variant=impl,
                bytes_read=2 * b * k_h * seq * hd * 2, seq=seq)
      del kc, vc
    del wq, wo


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
  ap.add_argument("--explore", action="store_true", help="time tuning variants on key shapes")
  ap.add_argument("--quick", action="store_true", help="a reduced sweep")
  ap.add_argument("--d-models", default="2048,4096,5120,7168,9216,12288")
  ap.add_argument("--densities", default="0.02,0.05,0.1,0.2,0.5,1.0")
  ap.add_argument("--batches", default="1,4,16,64")
  ap.add_argument("--batched-d-models", default="", help="d_models for B > 1 (default all)")
  ap.add_argument("--batched-densities", default="", help="densities for B > 1 (default all)")
  ap.add_argument("--skip-b1", action="store_true", help="skip the batch-1 MLP sweep")
  ap.add_argument("--attn-batches", default="1")
  ap.add_argument("--mosaic-explore", action="store_true",
                  help="time Mosaic GPU tunings on three mid shapes (batch 1)")
  ap.add_argument("--heads-kept", default="0.25,0.5,0.75,1.0")
  ap.add_argument("--attn-d-models", default="4096,12288")
  ap.add_argument("--skip-check", action="store_true")
  ap.add_argument("--skip-attn", action="store_true")
  ap.add_argument("--budget-s", type=float, default=440.0)
  ap.add_argument("--commit", default="")
  ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny shapes")
  ap.add_argument("--merge", nargs="+", metavar="JSON",
                  help="merge these kernels.json files into --out and redraw; no GPU")
  args = ap.parse_args()
  if args.merge:
    return merge(args.merge, args.out)
  if args.smoke:
    global PEAK_SHAPE
    PEAK_SHAPE = (1024, 1024)
    bench_kernels_check.CHECK_MLP = [(1024, 1, 0.05), (1024, 3, 0.1)]
    bench_kernels_check.CHECK_ATTN = [(256, 2, 0.5, 40)]
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  dev = jax.devices()[0]
  commit = args.commit or _git_commit()
  log(f"device {dev.device_kind} ({dev.platform}), jax {jax.__version__}, commit {commit}")
  log(dispatch.describe())
  peak, best = peak_read_bandwidth()
  log(f"peak read bandwidth: {peak:.0f} GB/s (4 GiB bf16 GEMV, best {best * 1e6:.0f} us)")
  ctx = Ctx(peak, dev.device_kind, jax.__version__, commit, [], args.out,
            start + args.budget_s)
  ok = {} if args.skip_check else check_correctness(correctness_variants())
  bad = sorted(k for k, v in ok.items() if not v)
  FAILED_CHECK.update(bad)
  log(f"correctness: {len(ok) - len(bad)}/{len(ok)} ok; failing: {bad}")
  parse = lambda s, f=float: [f(v) for v in s.split(",") if v]
  try:
    if args.explore:
      shapes = [(5120, 0.1, 1), (12288, 0.1, 1), (2048, 0.02, 1), (5120, 0.1, 16),
                (4096, 1.0, 1), (9216, 0.05, 1), (12288, 0.05, 16), (4096, 0.3, 64)]
      for d, dens, b in shapes:
        bench_mlp(ctx, [d], [dens], [b], explore_variants)
      if not args.skip_attn:
        bench_attention(ctx, [4096, 12288], [0.5], [1], seq=2048)
    else:
      d_models = parse(args.d_models, int)
      dens = parse(args.densities)
      batches = parse(args.batches, int)
      if not args.skip_b1 and 1 in batches:
        bench_mlp(ctx, d_models, dens, [1], default_variants)
      if args.mosaic_explore:
        for d, de in [(5120, 0.1), (7168, 0.1), (9216, 0.05)]:
          bench_mlp(ctx, [d], [de], [1], mosaic_variants)
      bd = parse(args.batched_d_models, int) or d_models
      bdens = parse(args.batched_densities) or dens
      if any(b > 1 for b in batches):
        bench_mlp(ctx, bd, bdens, [b for b in batches if b > 1], default_variants)
      if not args.skip_attn:
        bench_attention(ctx, parse(args.attn_d_models, int), parse(args.heads_kept),
                        parse(args.attn_batches, int))
  finally:
    try:
      plots(ctx.records, peak, args.out)
    except Exception as e:  # noqa: BLE001
      log(f"plot failed: {e}")
    summary(ctx.records, peak)
    log(f"total {time.time() - start:.0f} s")
    with open(os.path.join(args.out, "bench_log.txt"), "w") as f:
      f.write("\n".join(LOG))


def _git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except Exception:  # noqa: BLE001
    return "unknown"


if __name__ == "__main__":
  sys.exit(main())
