"""`FlaxOPT`: the same OPT as a Flax linen module, for code that wants ``init`` / ``apply``.

Its ``"params"`` collection is exactly the pytree documented in `dejavu_jax.model`, so params
from `load_opt` plug in unchanged and the sparse transforms keep working on them::

    module = FlaxOPT(model.config)
    logits = module.apply({"params": model.params}, tokens, attention_mask)
    params = module.init(jax.random.key(0), tokens)["params"]   # random init, same layout
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig


class FlaxOPT(nn.Module):
    config: OPTConfig
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T] int32 -> logits [B, T, vocab] f32."""
        shapes = M.param_shapes(self.config, self.param_dtype)
        params = {name: self.param(name, lambda key, name=name: M.init_params(
                      self.config, key, self.param_dtype)[name])
                  for name in shapes}
        return M.forward_params(params, tokens, self.config, attention_mask)
