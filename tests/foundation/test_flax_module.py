import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.flax_module import FlaxOPT


def test_flax_module_uses_the_same_params_and_numbers():
    cfg = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 7)), jnp.int32)
    module = FlaxOPT(cfg)
    params = module.init(jax.random.key(0), tokens)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(M.param_shapes(cfg))
    model = M.random_model(cfg, jnp.float32, std=0.2)
    np.testing.assert_allclose(module.apply({"params": model.params}, tokens),
                               M.forward_params(model.params, tokens, cfg), rtol=1e-6, atol=1e-6)
