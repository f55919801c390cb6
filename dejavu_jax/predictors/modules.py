"""The predictors: low-rank linear scorers, one per layer, stacked over layers.

Both predictors are ``x -> standardize(x) -> Linear(d, r, no bias) -> Linear(r, n) + bias``,
with n = ffn_dim (MLP: which neurons will be active) or n = heads (attention: which heads
will have the largest outputs). ``standardize`` is a LayerNorm without parameters (subtract
the mean, divide by the RMS, over d): the residual stream's scale grows with depth and varies
by token, while the layer sees its input through a LayerNorm; its cost is O(d), nothing
next to the matmuls. Scores are logits in f32: larger = more likely active / important.

Flax linen (not nnx): the parameters are plain dicts, so `jax.vmap(module.init)` stacks one
set per layer and training vmaps `module.apply` over that stack, orbax saves them as they
are, and `predict_*` are pure functions of arrays that sparse_decode calls under jit.

Which input a layer's predictor reads (``Predictors.lookahead``):

* lookahead=True (the default, the paper's): the predictors of layer l read layer l-1's
  attention input (the residual entering layer l-1), so they can run before layer l starts;
  layer 0 reads its own attention input (the embeddings).
* lookahead=False: layer l's head predictor reads layer l's attention input and its MLP
  predictor reads layer l's MLP input (the residual before mlp_ln).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import ConfigError
# standardize and low_rank_scores are defined beside the kernel that computes them for decoding
# (its reference is this definition); re-exported here as the predictors' own math.
from pallas_kernels.predict_sets import low_rank_scores, standardize  # noqa: F401

F32 = jnp.float32


def config_fingerprint(config: OPTConfig) -> str:
    """16 hex digits of sha256 over the config's Hugging Face dict (sorted JSON)."""
    blob = json.dumps(config.to_hf_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class LowRankScorer(nn.Module):
    """Flax module around `low_rank_scores`; params {"w1": [d, r], "w2": [r, n], "b2": [n]}."""

    rank: int
    num_outputs: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w1 = self.param("w1", nn.initializers.lecun_normal(), (x.shape[-1], self.rank), F32)
        w2 = self.param("w2", nn.initializers.lecun_normal(), (self.rank, self.num_outputs), F32)
        b2 = self.param("b2", nn.initializers.zeros, (self.num_outputs,), F32)
        return low_rank_scores(w1, w2, b2, x)


def init_stacked(key: jax.Array, num_layers: int, d: int, rank: int, num_outputs: int) -> dict:
    """One LowRankScorer's params per layer, stacked: {"w1": [L, d, r], "w2": [L, r, n], "b2": [L, n]}."""
    module = LowRankScorer(rank, num_outputs)
    keys = jax.random.split(key, num_layers)
    return jax.vmap(lambda k: module.init(k, jnp.zeros((1, d), F32))["params"])(keys)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Predictors:
    """Per-layer predictors of one model, stacked over its L layers (pass it through jit).

    Arrays (f32 as trained; ``astype(jnp.bfloat16)`` for decoding)::

        mlp_w1  [L, d, r]    mlp_w2  [L, r, F]    mlp_b2  [L, F]
        head_w1 [L, d, rh]   head_w2 [L, rh, H]   head_b2 [L, H]

    Static metadata: ``mlp_k`` / ``head_k`` (per layer, neurons / heads to keep, calibrated
    to a recall target; mlp_k a multiple of ``block_size`` or F), ``lookahead`` (see the
    module docstring), ``fingerprint`` (`config_fingerprint` of the model's config).
    """

    mlp_w1: jax.Array
    mlp_w2: jax.Array
    mlp_b2: jax.Array
    head_w1: jax.Array
    head_w2: jax.Array
    head_b2: jax.Array
    mlp_k: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    head_k: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    lookahead: bool = dataclasses.field(default=True, metadata=dict(static=True))
    fingerprint: str = dataclasses.field(default="", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=128, metadata=dict(static=True))

    ARRAYS = ("mlp_w1", "mlp_w2", "mlp_b2", "head_w1", "head_w2", "head_b2")

    @property
    def num_layers(self) -> int:
        return self.mlp_w1.shape[0]

    @property
    def rank(self) -> int:
        return self.mlp_w1.shape[-1]

    @property
    def head_rank(self) -> int:
        return self.head_w1.shape[-1]

    @property
    def mlp_density(self) -> tuple[float, ...]:
        return tuple(k / self.mlp_w2.shape[-1] for k in self.mlp_k)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name) for name in self.ARRAYS}

    def astype(self, dtype) -> "Predictors":
        """The weights in ``dtype`` (biases stay f32; they are tiny)."""
        return dataclasses.replace(self, **{n: a.astype(dtype) for n, a in self.arrays().items()
                                           if not n.endswith("b2")})

    def replace(self, **changes) -> "Predictors":
        """A copy with fields changed (e.g. ``mlp_k=...``), checked like the constructor's input."""
        out = dataclasses.replace(self, **changes)
        out.check()
        return out

    def num_bytes(self, layer: int | None = None) -> int:
        arrays = self.arrays().values()
        total = sum(a.size * a.dtype.itemsize for a in arrays)
        return total if layer is None else total // self.num_layers

    def check(self, config: OPTConfig | None = None) -> None:
        """Raise ConfigError unless shapes, k's and (given a config) the model's sizes agree."""
        L, d, r = self.mlp_w1.shape
        F, H = self.mlp_w2.shape[-1], self.head_w2.shape[-1]
        want = {"mlp_w2": (L, r, F), "mlp_b2": (L, F), "head_w1": (L, d, self.head_rank),
                "head_w2": (L, self.head_rank, H), "head_b2": (L, H)}
        for name, shape in want.items():
            if getattr(self, name).shape != shape:
                raise ConfigError(f"Predictors.{name} has shape {getattr(self, name).shape}, expected {shape}.")
        if len(self.mlp_k) != L or len(self.head_k) != L:
            raise ConfigError(f"Predictors need one mlp_k and one head_k per layer ({L}); got "
                              f"{len(self.mlp_k)} and {len(self.head_k)}.")
        if not all(0 < k <= F for k in self.mlp_k) or not all(0 < k <= H for k in self.head_k):
            raise ConfigError(f"mlp_k must lie in [1, {F}] and head_k in [1, {H}]; got mlp_k={self.mlp_k}, "
                              f"head_k={self.head_k}.")
        if config is not None:
            have = (L, d, F, H)
            need = (config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads)
            if have != need:
                raise ConfigError(
                    f"these predictors are for a model with (layers, hidden, ffn, heads) = {have}, but the "
                    f"model has {need}. Train predictors for this model: dejavu train-predictors.")


def predict_mlp_scores(pred: Predictors, layer: int | jax.Array, x: jax.Array) -> jax.Array:
    """Neuron scores of ``layer``'s MLP. x: [B, d] (or [..., d]): layer-1's attention input when
    ``pred.lookahead`` (layer 0: its own), else ``layer``'s MLP input. Returns [B, F] f32."""
    return low_rank_scores(pred.mlp_w1[layer], pred.mlp_w2[layer], pred.mlp_b2[layer], x)


def predict_head_scores(pred: Predictors, layer: int | jax.Array, x: jax.Array) -> jax.Array:
    """Head scores of ``layer``. x: [B, d] (or [..., d]): layer-1's attention input when
    ``pred.lookahead`` (layer 0: its own), else ``layer``'s attention input. Returns [B, H] f32."""
    return low_rank_scores(pred.head_w1[layer], pred.head_w2[layer], pred.head_b2[layer], x)


def predict_mlp_indices(pred: Predictors, layer: int, x: jax.Array, k: int | None = None) -> jax.Array:
    """The ``k`` (default ``pred.mlp_k[layer]``) highest-scoring neurons per row: [B, k] int32,
    best first. ``layer`` must be a Python int when k is None (k is a static shape)."""
    k = pred.mlp_k[layer] if k is None else k
    return jax.lax.top_k(predict_mlp_scores(pred, layer, x), k)[1].astype(jnp.int32)


def predict_head_indices(pred: Predictors, layer: int, x: jax.Array, k: int | None = None) -> jax.Array:
    """The ``k`` (default ``pred.head_k[layer]``) highest-scoring heads per row: [B, k] int32."""
    k = pred.head_k[layer] if k is None else k
    return jax.lax.top_k(predict_head_scores(pred, layer, x), k)[1].astype(jnp.int32)


def predictor_input_layer(pred: Predictors, layer: int) -> tuple[int, str, str]:
    """Where ``layer``'s predictors read their input: (source layer, MLP predictor's input,
    head predictor's input), the inputs named "attn_in" or "mlp_in" (see the module docstring)."""
    if pred.lookahead:
        return max(layer - 1, 0), "attn_in", "attn_in"
    return layer, "mlp_in", "attn_in"


def round_up(k: float, block: int, limit: int) -> int:
    """k rounded up to a multiple of ``block``, at least one block, at most ``limit``."""
    return int(min(limit, max(block, -(-int(round(k)) // block) * block)))


def random_predictors(config: OPTConfig, rank: int, *, head_rank: int | None = None, mlp_density: float = 0.1,
                      head_keep: float = 0.5, block_size: int = 128, lookahead: bool = True,
                      dtype=jnp.bfloat16, seed: int = 0) -> Predictors:
    """Predictors of the right shapes with random weights, for speed benchmarks (their
    selections are meaningless). mlp_k = mlp_density * F rounded up to ``block_size``;
    head_k = ceil(head_keep * H)."""
    if not 0 < mlp_density <= 1 or not 0 < head_keep <= 1:
        raise ConfigError(f"mlp_density and head_keep must lie in (0, 1]; got {mlp_density}, {head_keep}.")
    L, d, F, H = config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads
    head_rank = rank if head_rank is None else head_rank
    k1, k2 = jax.random.split(jax.random.key(seed))
    # drawn and cast inside one jit: no f32 copy of the whole stack (2.8 GB at OPT-30B, rank 512)
    mlp, head = jax.jit(lambda: jax.tree.map(lambda a: a.astype(dtype) if a.ndim == 3 else a,
                                             (init_stacked(k1, L, d, rank, F),
                                              init_stacked(k2, L, d, head_rank, H))))()
    mlp_k = round_up(mlp_density * F, block_size, F)
    head_k = min(H, max(1, math.ceil(head_keep * H - 1e-9)))
    pred = Predictors(mlp["w1"], mlp["w2"], mlp["b2"], head["w1"], head["w2"], head["b2"],
                      mlp_k=(mlp_k,) * L, head_k=(head_k,) * L, lookahead=lookahead,
                      fingerprint=config_fingerprint(config), block_size=block_size)
    return pred.astype(dtype)


def from_stacked(mlp: dict, head: dict, config: OPTConfig, *, mlp_k, head_k, lookahead: bool,
                 block_size: int) -> Predictors:
    """Predictors from trained stacked LowRankScorer params (see `init_stacked`)."""
    pred = Predictors(mlp["w1"], mlp["w2"], mlp["b2"], head["w1"], head["w2"], head["b2"],
                      mlp_k=tuple(int(k) for k in mlp_k), head_k=tuple(int(k) for k in head_k),
                      lookahead=bool(lookahead), fingerprint=config_fingerprint(config),
                      block_size=int(block_size))
    pred.check(config)
    return pred
