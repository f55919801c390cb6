"""GPU check: does a Mosaic GPU kernel that waits with `griddepcontrol.wait` launch as a
programmatic dependent of the kernel before it, under XLA, on this machine?

Kernel A lets its dependents launch at its start (`griddepcontrol.launch_dependents`), then
spins for about a millisecond and writes 1s into a zeroed buffer. Kernel B, the next kernel in
the stream, reads that buffer before its `griddepcontrol.wait` and after. Launched as a
programmatic dependent, B runs during A's spin and reads 0 first and 1 after; serialized, it
reads 1 both times. Run at the top level of a jit and inside a `fori_loop` (where XLA may
capture the body as a CUDA graph). Prints one JSON line a case; pass XLA_FLAGS to compare.

    PYTHONPATH=. python3 scripts/check_pdl.py [--time] [--out DIR]

With --time, also the wall time of boundary + MLP pairs chained in one jit at the OPT-13B
shape, with and without programmatic dependent launch (`time_pairs`); --out writes pdl.json
(device, jax version, commit, records) and, with --time, pdl.png.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

N = 512  # a warpgroup's WG-strided f32 row
LAYOUT = plgpu.Layout.WG_STRIDED((N,), vec_size=4)


def _spin_then_write(n_ref, x_ref, buf_ref):
  plgpu.griddepcontrol_launch_dependents()
  x = plgpu.load(x_ref.at[0], layout=LAYOUT)
  x = lax.fori_loop(0, n_ref[0], lambda i, x: x * 0.999999 + 1e-6, x)
  buf_ref[0] = jnp.where(x > -1.0, 1.0, 2.0)  # 1 everywhere (x stays near 1)


def _read_wait_read(buf_ref, out_ref):
  early = plgpu.load(buf_ref.at[0], layout=LAYOUT)
  plgpu.griddepcontrol_wait()
  late = plgpu.load(buf_ref.at[0], layout=LAYOUT)
  out_ref[0] = early
  out_ref[1] = late


def pair(n, x):
  buf = jax.new_ref(jnp.zeros((1, N), jnp.float32))
  plgpu.kernel(_spin_then_write, out_type=(), grid=(1,), grid_names=("g",))(n, x, buf)
  return plgpu.kernel(_read_wait_read, out_type=jax.ShapeDtypeStruct((2, N), jnp.float32), grid=(1,),
                      grid_names=("g",))(buf)


def in_loop(n, x):
  def body(i, acc):
    out = pair(n, x + acc[1:, :] * 0.0)
    return acc + out
  return lax.fori_loop(0, 4, body, jnp.zeros((2, N), jnp.float32)) / 4


def launch_cases() -> list[dict]:
  """The early-read test at the top level of a jit and in a `fori_loop` body."""
  n = jnp.array([200_000], jnp.int32)
  x = jnp.ones((1, N), jnp.float32)
  recs = []
  for name, fn in (("top level", pair), ("fori_loop body", in_loop)):
    out = jax.device_get(jax.jit(fn)(n, x))
    early, late = float(out[0].mean()), float(out[1].mean())
    recs.append(dict(case=name, xla_flags=os.environ.get("XLA_FLAGS", ""), read_before_wait=early,
                     read_after_wait=late, dependent_ran_early=early < late))
    print(json.dumps(recs[-1]), flush=True)
  return recs


def plot(recs: list[dict], path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from dejavu_jax.figures import save_figure

  timed = [r for r in recs if "us_per_pair" in r]
  fig, ax = plt.subplots(figsize=(7, 2.6))
  ax.barh(range(len(timed)), [r["us_per_pair"] for r in timed], color="tab:blue")
  for i, r in enumerate(timed):
    ax.text(r["us_per_pair"] + 0.3, i, f"{r['us_per_pair']:.1f} us", va="center", fontsize=8)
  ax.set_yticks(range(len(timed)), [r["case"] for r in timed], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel(f"wall us per boundary + MLP pair ({timed[0]['links']} chained in a loop body, OPT-13B shape, "
                "10% count)")
  ax.set_title("Programmatic dependent launch of the Mosaic MLP: no gain", fontsize=9)
  fig.tight_layout()
  save_figure(fig, path, colors=32)  # flat bars
  plt.close(fig)


def main(argv=None) -> int:
  import argparse
  from pathlib import Path

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--time", action="store_true", help="also time chained boundary + MLP pairs")
  p.add_argument("--out", help="write pdl.json (and with --time pdl.png) here")
  args = p.parse_args(argv)
  recs = launch_cases() + (time_pairs() if args.time else [])
  if args.out:
    from dejavu_jax.bench import dump_json, environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pdl.json").write_text(dump_json(dict(environment(), records=recs)))
    if args.time:
      plot(recs, out / "pdl.png")
  return 0


def time_pairs(links: int = 16, loops: int = 8, reps: int = 10) -> list[dict]:
  """Wall time of ``links`` boundary + MLP pairs chained in the body of a ``loops``-step
  `fori_loop` (so the GPU, not the host's launches, sets the pace, as in the decode loop) at the
  OPT-13B shape (a 10% count in a 20% cap), with and without programmatic dependent launch,
  and with the Triton boundary before the PDL MLP."""
  import time

  import numpy as np

  from dejavu_jax.bench_sparse import constants_set
  from pallas_kernels import layer_norm as ln
  from pallas_kernels import sparse_mlp as sm

  d, F = 5120, 20480
  key = jax.random.key(0)
  w = lambda i, shape, s: (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * s).astype(jnp.bfloat16)
  fc1, fc2t, b1 = w(1, (F, d), d**-0.5), w(2, (F, d), F**-0.5), w(3, (F,), 0.5)
  scale, shift, bias = w(4, (d,), 1.0) + 1.0, w(5, (d,), 0.1), w(6, (d,), 0.5)
  sets = [jax.random.permutation(jax.random.fold_in(key, 100 + i), F)[:F // 5].astype(jnp.int32) for i in range(links)]
  count = jnp.int32(F // 10)
  x0, delta0 = w(7, (1, d), 4.0), w(8, (1, d), 1.0).astype(jnp.float32)
  recs = []
  cases = (("Triton boundary, no PDL", "triton", False), ("Mosaic boundary, no PDL", "mosaic", False),
           ("Mosaic boundary + MLP, PDL", "mosaic", True), ("Triton boundary, MLP PDL", "triton", True))
  for label, ln_impl, pdl in cases:
    def chain(x, delta):
      def body(_, carry):
        x, delta = carry
        for i in range(links):
          x, h = ln.add_layer_norm(x, delta, scale, shift, 1e-5, bias=bias, impl=ln_impl)
          delta = sm.sparse_mlp(h, fc1, b1, fc2t, None, sets[i], count=count, impl="mosaic", checked=False,
                                out_dtype=jnp.float32)
        return x, delta * 1e-3
      return lax.fori_loop(0, loops, body, (x, delta))  # in a loop body, as in the decode step

    with constants_set({"pallas_kernels.layer_norm.PDL": pdl, "pallas_kernels._mosaic_mlp.PDL": pdl}):
      fn = jax.jit(chain)
      jax.block_until_ready(fn(x0, delta0))
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(x0, delta0))
        times.append((time.perf_counter() - t) / (links * loops) * 1e6)
    recs.append(dict(case=label, us_per_pair=float(np.median(times)), links=links, loops=loops))
    print(json.dumps(recs[-1]), flush=True)
  return recs


if __name__ == "__main__":
  sys.exit(main())
