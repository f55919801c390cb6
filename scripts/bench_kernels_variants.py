"""Variant tables of the kernel benchmark (scripts/bench_kernels.py, which re-exports these):
the sparse-MLP variants timed by default, by --explore and by --mosaic-explore, and the
jitted variants of the correctness check."""

from __future__ import annotations

import jax

from pallas_kernels import sparse_mlp as sm
from pallas_kernels import _mosaic_mlp as mm


def default_variants(b):
  v = {"triton": ("triton", None, None)}
  if b == 1:
    v["mosaic"] = ("mosaic", None, None)
  return v


def explore_variants(b):
  """Tuning variants timed by --explore (none of them spills registers in ptxas -v)."""
  T = sm.SparseMLPTuning
  M = mm.MosaicMLPTuning
  if b == 1:
    return {
        "tr-fused-k16-d512-w4": ("triton", T("fused", 16, 512, num_warps=4), None),
        "tr-fused-k8-d512-w4": ("triton", T("fused", 8, 512, num_warps=4), None),
        "tr-fused-k8-d1024-w4": ("triton", T("fused", 8, 1024, num_warps=4), None),
        "tr-fused-k16-d1024-w8": ("triton", T("fused", 16, 1024, num_warps=8), None),
        "tr-fused-k32-d512-w8": ("triton", T("fused", 32, 512, num_warps=8), None),
        "tr-fused-k16-d512-atomic": ("triton", T("fused", 16, 512, reduce="atomic"), None),
        "tr-fused-k8-d512-atomic": ("triton", T("fused", 8, 512, reduce="atomic"), None),
        "tr-split-k16-d512": ("triton", T("split", 16, 512), None),
        "tr-split-k16-d1024-w8": ("triton", T("split", 16, 1024, num_warps=8), None),
        "mosaic-auto": ("mosaic", None, None),
        "mosaic-r1-c264": ("mosaic", None, M(rows_per_group=1, ctas=264)),
        "mosaic-r2-c264": ("mosaic", None, M(rows_per_group=2, ctas=264)),
        "mosaic-r1-c528": ("mosaic", None, M(rows_per_group=1, ctas=528)),
        "mosaic-r4-c132": ("mosaic", None, M(rows_per_group=4, ctas=132)),
    }
  return {
      "tr-split-k16-d512": ("triton", T("split", 16, 512), None),
      "tr-split-k16-d256": ("triton", T("split", 16, 256), None),
      "tr-split-k32-d512-w8": ("triton", T("split", 32, 512, num_warps=8), None),
      "tr-split-k64-d256-w8": ("triton", T("split", 64, 256, num_warps=8), None),
      "tr-fused-k64-d512-w8": ("triton", T("fused", 64, 512, num_warps=8), None),
      "tr-fused-k32-d256-w4": ("triton", T("fused", 32, 256, num_warps=4), None),
  }


def mosaic_variants(b):
  M = mm.MosaicMLPTuning
  del b
  return {f"mosaic-r{r}-c{c}": ("mosaic", None, M(rows_per_group=r, ctas=c))
          for r, c in [(1, 132), (1, 264), (2, 132), (2, 264), (4, 132), (2, 396)]}


def correctness_variants():
  T = sm.SparseMLPTuning

  def mk(impl, tuning=None):
    @jax.jit
    def f(x, w1, b1, w2t, b2, idx, count, mask):
      return sm.sparse_mlp_masked(x, w1, b1, w2t, b2, idx, mask, count=count, impl=impl,
                                  tuning=tuning, checked=False)
    return f
  return {"xla": mk("xla"), "triton-auto": mk("triton"),
          "triton-fused": mk("triton", T("fused", 16, 512)),
          "triton-fused-atomic": mk("triton", T("fused", 16, 512, reduce="atomic")),
          "triton-split": mk("triton", T("split", 16, 512)),
          "mosaic": mk("mosaic")}
