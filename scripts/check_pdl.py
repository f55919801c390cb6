"""GPU check: does a Mosaic GPU kernel that waits with `griddepcontrol.wait` launch as a
programmatic dependent of the kernel before it, under XLA, on this machine?

Kernel A lets its dependents launch at its start (`griddepcontrol.launch_dependents`), then
spins for about a millisecond and writes 1s into a zeroed buffer. Kernel B, the next kernel in
the stream, reads that buffer before its `griddepcontrol.wait` and after. Launched as a
programmatic dependent, B runs during A's spin and reads 0 first and 1 after; serialized, it
reads 1 both times. Run at the top level of a jit and inside a `fori_loop` (where XLA may
capture the body as a CUDA graph). Prints one JSON line a case; pass XLA_FLAGS to compare.

    PYTHONPATH=. python3 scripts/check_pdl.py
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


def main() -> int:
  n = jnp.array([200_000], jnp.int32)
  x = jnp.ones((1, N), jnp.float32)
  for name, fn in (("top level", pair), ("fori_loop body", in_loop)):
    out = jax.device_get(jax.jit(fn)(n, x))
    early, late = float(out[0].mean()), float(out[1].mean())
    print(json.dumps(dict(case=name, xla_flags=os.environ.get("XLA_FLAGS", ""), read_before_wait=early,
                          read_after_wait=late, dependent_ran_early=early < late,
                          device=jax.devices()[0].device_kind, jax_version=jax.__version__)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
