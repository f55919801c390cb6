"""dejavu-jax: Deja Vu contextual sparsity for OPT in JAX, Flax and Pallas.

The public API (``import dejavu_jax as dj``)::

    model = dj.load_opt(path, dtype=jnp.bfloat16)        # HF OPT dir or orbax dir
    logits = dj.forward(model, tokens, attention_mask=None)
    out = dj.dense_decode(model, prompt_tokens, max_new_tokens=32, ...)
    dj.save(model, ckpt_dir)
    predictors = dj.train_predictors(model, ...); dj.load_predictors(path, model)
    out = dj.sparse_decode(model, predictors, prompt_tokens, max_new_tokens=32,
                           sparsity=dj.SparsityConfig(mlp_density=0.1, head_keep=0.5))
    mesh = dj.make_mesh(tp=2); model = dj.load_opt(path, mesh=mesh)   # tensor parallel
    out = dj.tp_sparse_decode(model, predictors, prompt_tokens, 32, mesh=mesh, sparsity=...)

Names resolve lazily, so ``import dejavu_jax`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "OPTConfig": "dejavu_jax.config",
    "preset": "dejavu_jax.config",
    "PRESETS": "dejavu_jax.config",
    "OPTModel": "dejavu_jax.model",
    "random_model": "dejavu_jax.model",
    "FlaxOPT": "dejavu_jax.flax_module",
    "init_params": "dejavu_jax.model",
    "forward": "dejavu_jax.decode",
    "dense_decode": "dejavu_jax.decode",
    "generate": "dejavu_jax.decode",
    "load_tokenizer": "dejavu_jax.decode",
    "load_opt": "dejavu_jax.checkpoint",
    "save": "dejavu_jax.checkpoint",
    "save_hf": "dejavu_jax.checkpoint",
    "convert": "dejavu_jax.checkpoint",
    "collect_activations": "dejavu_jax.predictors",
    "train_predictors": "dejavu_jax.predictors",
    "load_predictors": "dejavu_jax.predictors",
    "Predictors": "dejavu_jax.predictors",
    "save_predictors": "dejavu_jax.predictors",
    "random_predictors": "dejavu_jax.predictors",
    "TrainSettings": "dejavu_jax.predictors",
    "sparse_decode_fn": "dejavu_jax.sparse",
    "sparse_decode": "dejavu_jax.sparse",
    "SparsityConfig": "dejavu_jax.sparse",
    "DejavuError": "dejavu_jax.errors",
    "make_mesh": "dejavu_jax.parallel",
    "tp_dense_decode": "dejavu_jax.parallel",
    "tp_sparse_decode": "dejavu_jax.parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dejavu_jax' has no attribute {name!r}")


def __dir__():
    return __all__
