"""Which backend `impl="auto"` runs, by device and by measured numbers.

    >>> backend_for("sparse_mlp")            # on a CPU
    'xla'

Pallas kernels run only where they were measured faster (Hopper: H100/H200); everywhere
else `auto` is the XLA path (`jnp.take` + dot), which is portable and correct. The table
below records the winner per op and batch regime from `scripts/bench_kernels.py`
(benchmarks/results/kernels.json); pallas_kernels/NOTES.md gives the numbers.
"""

from __future__ import annotations

import jax

OPS = ("sparse_mlp", "sparse_fc1", "sparse_fc2", "head_sparse_qkv", "head_sparse_out",
       "head_sparse_decode_attention", "top_k_select", "threshold_compact", "matvec_t", "predict_sets",
       "add_layer_norm")

# (op, batch regime) -> backend on Hopper. "b1" is batch 1, "batched" is 2..64.
# From the H100 runs in NOTES.md (benchmarks/results/kernels.json):
# - batch-1 sparse MLP: Mosaic GPU, 0.75-0.94 of peak at d = 12288 from 10% density and
#   0.91-1.10x the dense MLP at full density (Triton fused: 25-40% slower at large sizes);
# - batched: the Triton split kernels, 0.9-2.1x (median 1.5x) the XLA gather path;
# - head projections and decode attention: Triton, up to 2.8x / 3.7x the gather path.
# The Mosaic kernel covers batch 1 without a mask and d a multiple of 1024 (bf16); other
# calls with impl="mosaic" run the Triton kernels.
# - top_k_select (pallas_kernels/select.py): XLA's sort-based lax.top_k. The Triton selection
#   kernel is exact but took 60 us per 20 480-score row inside the OPT-13B decode loop, against
#   32 us for the sort (benchmarks/results/select.json,
#   sparse_profile_select_kernel.json; NOTES.md).
# - threshold_compact (select.py, batch 1): XLA's nonzero (prefix sum in 4 reduce-window
#   kernels + a scatter), 13.8 us a layer at F = 20 480; the one-program Triton kernel took
#   14.1 us at its best warp count (8) and 27 us at 32 (layer_kernels.json; NOTES.md).
# - matvec_t (matvec.py, the predictors' low-rank GEMVs): Triton at batch 1 (XLA's column
#   reduction reached 0.10-0.32 of peak at the OPT-13B/30B predictor shapes). The decode loop
#   asks for it only for MLP predictors of rank >= 512 (`dejavu_jax.sparse.decode_scores`):
#   at rank 256 XLA was as fast.
# - predict_sets (predict_sets.py, a layer's batch-1 threshold sets): Triton, three kernels
#   instead of ~19 XLA ones: 16.0 vs 38.1 us a layer at OPT-13B, 36.0 vs 55.5 at 30B
#   (layer_kernels.json); the 13B decode step 6.02 -> 5.20 ms (sparse_decode.json).
# - add_layer_norm (layer_norm.py, the decode step's residual add + bias + LayerNorm): Triton,
#   one kernel (about 3 us at OPT-13B) instead of 3-4 XLA ones; with it and the q + K/V-into-
#   cache kernel (head_sparse_q_kv_update, under head_sparse_qkv's entry) the 13B step went
#   from 5.24 to 4.73 ms at batch 1, 12.57 to 11.41 at batch 4 and 14.33 to 13.01 at batch 16
#   (sparse_decode.json, glue=unfused in the same runs).
HOPPER_TABLE: dict[tuple[str, str], str] = {
    ("sparse_mlp", "b1"): "mosaic",
    ("sparse_mlp", "batched"): "triton",
    ("sparse_fc1", "b1"): "triton",
    ("sparse_fc1", "batched"): "triton",
    ("sparse_fc2", "b1"): "triton",
    ("sparse_fc2", "batched"): "triton",
    ("head_sparse_qkv", "b1"): "triton",
    ("head_sparse_qkv", "batched"): "triton",
    ("head_sparse_out", "b1"): "triton",
    ("head_sparse_out", "batched"): "triton",
    ("head_sparse_decode_attention", "b1"): "triton",
    ("head_sparse_decode_attention", "batched"): "triton",
    ("top_k_select", "b1"): "xla",
    ("top_k_select", "batched"): "xla",
    ("threshold_compact", "b1"): "xla",
    ("matvec_t", "b1"): "triton",
    ("predict_sets", "b1"): "triton",
    ("add_layer_norm", "b1"): "triton",
    ("add_layer_norm", "batched"): "triton",
}


def is_hopper(device=None) -> bool:
  dev = device if device is not None else jax.devices()[0]
  if dev.platform != "gpu":
    return False
  kind = str(getattr(dev, "device_kind", ""))
  return any(name in kind for name in ("H100", "H200", "H800", "GH200", "H20"))


def backend_for(op: str, device=None, *, batch: int = 1) -> str:
  """The backend `impl="auto"` picks for `op` on `device` (default: the first device):
  "mosaic", "triton" or "xla"."""
  if op not in OPS:
    raise ValueError(f"Unknown op {op!r}; known ops: {OPS}.")
  if not is_hopper(device):
    return "xla"
  return HOPPER_TABLE.get((op, "b1" if batch == 1 else "batched"), "xla")


def describe(device=None) -> str:
  """One line per op: what `auto` runs here, for batch 1 and batched calls."""
  dev = device if device is not None else jax.devices()[0]
  lines = [f"device: {getattr(dev, 'device_kind', dev.platform)}"]
  for op in OPS:
    lines.append(f"  {op}: batch 1 -> {backend_for(op, dev, batch=1)}, "
                 f"batched -> {backend_for(op, dev, batch=2)}")
  return "\n".join(lines)
