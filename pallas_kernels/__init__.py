"""Pallas GPU kernels for Deja Vu contextual sparsity, each beside its jnp reference.

    from pallas_kernels.sparse_mlp import sparse_mlp, sparse_mlp_reference
    from pallas_kernels.sparse_attention import head_sparse_qkv, head_sparse_out
    from pallas_kernels import backend_for

`impl="auto"` (the default) runs the backend `backend_for(op)` names: Mosaic GPU / Triton
Pallas kernels on Hopper, the XLA path (`jnp.take` + dot) elsewhere. NOTES.md has the
H100 numbers behind that choice. (The functions are not re-exported here: the module
`sparse_mlp` and the function `sparse_mlp` would collide.)
"""

from pallas_kernels.dispatch import backend_for, describe
from pallas_kernels._common import validate_indices

__all__ = ["backend_for", "describe", "validate_indices"]
