"""The layer boundary before the MLP and the sparse MLP in one kernel (batch 1), with reference.

    boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx, count=, eps=, bias=)
        == boundary_sparse_mlp_reference(...)  -> (x_new, y)
    x_new, h = add_layer_norm(x, delta, scale, shift, eps, bias=bias)     (layer_norm.py)
    y        = sparse_mlp(h, w1, b1, w2t, b2, idx, count=count)           (sparse_mlp.py)

Why: in a pre-LayerNorm decode step the boundary (residual add + LayerNorm, 30 KB of data) is
a kernel of its own between the attention's out-projection and the MLP: about 3 us a layer at
the OPT-13B shape on an H100, launch and latency, not bytes. Here every CTA of the Mosaic GPU
MLP (`pallas_kernels._mosaic_mlp.boundary_partials`) issues its first weight rows, then
computes the boundary's row itself (the same arithmetic as `add_layer_norm`'s kernels; the
row is 30 KB, read from L2 by each CTA) while those rows are in flight; CTA 0 stores x_new.
One kernel a layer less.

Backends (`impl`): "mosaic" (batch 1, one delta [1, d], d a multiple of the 16-byte weight
row vectors; else the two calls below), "triton", "xla", "auto" (the two calls:
`add_layer_norm` + `sparse_mlp`, each on its own dispatch), "reference" (the jnp references).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import _common as c
from pallas_kernels import _mosaic_mlp
from pallas_kernels.layer_norm import add_layer_norm, add_layer_norm_reference, check_args
from pallas_kernels.sparse_mlp import (_check_mlp_args, _finish, _maybe_validate, sparse_mlp,
                                      sparse_mlp_reference)


def boundary_sparse_mlp_reference(x, delta, scale, shift, w1, b1, w2t, b2, idx, *, count=None, eps: float = 1e-5,
                                  bias=None, out_dtype=None):
  """(x_new, y): `add_layer_norm_reference`, then `sparse_mlp_reference` of its h."""
  x_new, h = add_layer_norm_reference(x, delta, scale, shift, eps, bias)
  return x_new, sparse_mlp_reference(h, w1, b1, w2t, b2, idx, count=count, out_dtype=out_dtype or x.dtype)


def fused(x, delta, w1, impl: str) -> bool:
  """Whether `boundary_sparse_mlp` runs as the one Mosaic kernel for these arguments."""
  return (impl == "mosaic" and x.shape[0] == 1 and getattr(delta, "ndim", 0) == 2
          and _mosaic_mlp.supported(x, w1, None))


def boundary_sparse_mlp(x, delta, scale, shift, w1, b1, w2t, b2, idx, *, count=None, eps: float = 1e-5, bias=None,
                        impl: str = "auto", tuning: _mosaic_mlp.MosaicMLPTuning | None = None, checked: bool = True,
                        out_dtype=None):
  """x [B, d] (the residual stream) + (delta [B, d] + bias [d] or None), its LayerNorm h with
  scale / shift [d], and the sparse MLP of h -> (x_new [B, d] in x.dtype, y [B, d] in
  ``out_dtype``, default x.dtype; float32 with b2=None: the unrounded f32 sum, for the next
  boundary to add b2). See the module docstring."""
  check_args(x, delta, scale, shift, eps, bias)
  if delta.ndim != 2:
    raise ValueError(f"delta must be [batch, d] (one sum), got shape {delta.shape}.")
  b, d, d_ff = _check_mlp_args(x, w1, b1, w2t, b2, idx)
  _maybe_validate(checked, idx, d_ff, count)
  impl = c.resolve_impl(impl, "sparse_mlp", b)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if impl == "reference":
    return boundary_sparse_mlp_reference(x, delta, scale, shift, w1, b1, w2t, b2, idx, count=count, eps=eps,
                                         bias=bias, out_dtype=out_dtype)
  if not fused(x, delta, w1, impl) or idx.shape[0] == 0:
    x_new, h = add_layer_norm(x, delta, scale, shift, eps, bias=bias, impl=impl)
    return x_new, sparse_mlp(h, w1, b1, w2t, b2, idx, count=count, impl=impl, checked=False, out_dtype=out_dtype)
  part, x_new = _mosaic_mlp.boundary_partials(x, delta, bias, scale, shift, w1, b1, w2t, idx, count, eps=float(eps),
                                              tuning=tuning, interpret=c.on_cpu())
  return x_new, _finish(part.sum(0, keepdims=True), b2, out_dtype)
