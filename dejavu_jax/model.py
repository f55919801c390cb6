"""OPT in JAX: parameters are a plain pytree, a layer's attention and MLP are pure functions.

Parameter layout (d = hidden_size, H = heads, hd = head_dim, F = ffn_dim,
E = word_embed_proj_dim, V = vocab_size, P = max_position_embeddings; all arrays in the
model dtype)::

    params = {
      "embed_tokens":     [V, E]          token embedding, tied LM head (logits = x @ W.T)
      "embed_positions":  [P + 2, d]      learned positions; position p is row p + 2
      "project_in":       [E, d]          only when E != d (opt-350m): x_d = x_E @ W
      "project_out":      [d, E]          only when E != d
      "final_layer_norm": {"scale": [d], "bias": [d]}   only when do_layer_norm_before
      "layers": [layer_0, ..., layer_{L-1}]           a Python list, unrolled under jit
    }
    layer = {
      "attn_ln": {"scale": [d], "bias": [d]},
      "attn": {"wqkv": [3, H, hd, d],   q, k, v weights; wqkv[s, h] is head h's [hd, d] slice
               "bqkv": [3, H, hd],
               "wo_t": [H, hd, d],      out_proj weight transposed: wo_t[h] reads head h's output
               "bo":   [d]},
      "mlp_ln": {"scale": [d], "bias": [d]},
      "mlp": {"fc1":   [F, d],          row i = neuron i's input weights (HF fc1.weight)
              "b1":    [F],
              "fc2_t": [F, d],          row i = neuron i's output weights (HF fc2.weight.T)
              "b2":    [d]},
    }

Every row a sparse kernel gathers (a neuron's fc1 / fc2 weights, a head's q/k/v/out slice)
is contiguous in memory. Biases and LayerNorm parameters are always present: zeros (and
ones for LayerNorm scales) stand in when ``enable_bias`` / ``layer_norm_elementwise_affine``
are off, which keeps every layer's pytree the same shape. Conversion from and to Hugging
Face names lives in `dejavu_jax.weights`.

KV cache: a list with one ``{"k": [B, H, S, hd], "v": [B, H, S, hd]}`` per layer (heads
major, so one head's cache is contiguous for head-sparse attention).

Numerics follow HF's OPT: LayerNorm (eps 1e-5), softmax and logits in f32; matmuls
accumulate in f32 and round to the model dtype; q is scaled by hd**-0.5 after its bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.config import POSITION_OFFSET, OPTConfig

Params = dict[str, Any]
LayerCache = dict[str, jax.Array]
F32 = jnp.float32
# Added to masked attention scores. Finite, so a fully masked row (a left-pad query)
# softmaxes to a uniform row instead of NaN, as HF's eager attention does.
MASK_VALUE = float(np.finfo(np.float32).min)


# ---- building blocks ------------------------------------------------------------------------
def layer_norm(p: dict[str, jax.Array], x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """LayerNorm over the last axis, computed in f32. x: [..., d] -> [..., d] in x.dtype."""
    xf = x.astype(F32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"].astype(F32) + p["bias"].astype(F32)).astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array, spec: str, b: jax.Array | None = None) -> jax.Array:
    """einsum with f32 accumulation, bias added in f32, result in x.dtype."""
    y = jnp.einsum(spec, x, w, preferred_element_type=F32)
    if b is not None:
        y = y + b.astype(F32)
    return y.astype(x.dtype)


def qkv_projection(p: Params, x: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: [B, T, d] -> q (scaled by head_dim**-0.5), k, v: each [B, T, H, hd]."""
    y = jnp.einsum("btd,shkd->sbthk", x, p["wqkv"], preferred_element_type=F32)
    y = (y + p["bqkv"].astype(F32)[:, None, None]).astype(x.dtype)
    q = y[0] * jnp.asarray(head_dim**-0.5, x.dtype)
    return q, y[1], y[2]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax attention. q: [B, T, H, hd] (scaled); k, v: [B, H, S, hd];
    allowed: [B, T, S] bool (query t may see key s). Returns [B, T, H, hd] in q.dtype."""
    scores = jnp.einsum("bthk,bhsk->bhts", q, k, preferred_element_type=F32)
    scores = jnp.where(allowed[:, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsk->bthk", probs, v, preferred_element_type=F32).astype(q.dtype)


def out_projection(p: Params, o: jax.Array) -> jax.Array:
    """o: [B, T, H, hd] -> [B, T, d]."""
    return _linear(o, p["wo_t"], "bthk,hkd->btd", p["bo"])


def attention(p: Params, x: jax.Array, cache: LayerCache | None, allowed: jax.Array,
              write_index: jax.Array | int, *, config: OPTConfig) -> tuple[jax.Array, LayerCache | None]:
    """Dense self-attention of one layer.

    x: [B, T, d] (after the pre-LayerNorm). With ``cache`` None the keys are this chunk's own
    (full-sequence forward; allowed: [B, T, T]). With a cache ([B, H, S, hd] each), this
    chunk's K/V are written at slots ``write_index .. write_index + T`` and the queries attend
    over all S slots (allowed: [B, T, S]). Returns ([B, T, d], updated cache or None).
    """
    q, k, v = qkv_projection(p, x, config.head_dim)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, T, hd]
    if cache is not None:
        start = (0, 0, write_index, 0)
        k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        cache = {"k": k, "v": v}
    return out_projection(p, attend(q, k, v, allowed)), cache


def mlp(p: Params, x: jax.Array) -> jax.Array:
    """relu(x @ fc1.T + b1) @ fc2_t + b2. x: [B, T, d] -> [B, T, d]."""
    h = jax.nn.relu(_linear(x, p["fc1"], "btd,fd->btf", p["b1"]))
    return _linear(h, p["fc2_t"], "btf,fd->btd", p["b2"])


AttentionFn = Callable[..., tuple[jax.Array, LayerCache | None]]
MlpFn = Callable[[Params, jax.Array], jax.Array]


def decoder_layer(lp: Params, x: jax.Array, cache: LayerCache | None, allowed: jax.Array,
                  write_index: jax.Array | int, *, config: OPTConfig,
                  attention_fn: AttentionFn = attention, mlp_fn: MlpFn = mlp):
    """One OPT decoder layer (pre- or post-LayerNorm). ``attention_fn`` / ``mlp_fn`` have the
    signatures of `attention` / `mlp`; a sparse transform passes its own.
    Returns (x [B, T, d], cache)."""
    eps = config.layer_norm_eps
    pre = config.do_layer_norm_before
    h = layer_norm(lp["attn_ln"], x, eps) if pre else x
    h, cache = attention_fn(lp["attn"], h, cache, allowed, write_index, config=config)
    x = x + h
    if not pre:
        x = layer_norm(lp["attn_ln"], x, eps)
    h = layer_norm(lp["mlp_ln"], x, eps) if pre else x
    x = x + mlp_fn(lp["mlp"], h)
    if not pre:
        x = layer_norm(lp["mlp_ln"], x, eps)
    return x, cache


def embed(params: Params, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """tokens, positions: [B, T] int32 -> [B, T, d]."""
    x = jnp.take(params["embed_tokens"], tokens, axis=0)
    if "project_in" in params:
        x = _linear(x, params["project_in"], "bte,ed->btd")
    return x + jnp.take(params["embed_positions"], positions + POSITION_OFFSET, axis=0)


def lm_head(params: Params, x: jax.Array, config: OPTConfig) -> jax.Array:
    """x: [..., d] -> logits [..., V] in f32."""
    if "final_layer_norm" in params:
        x = layer_norm(params["final_layer_norm"], x, config.layer_norm_eps)
    if "project_out" in params:
        x = jnp.einsum("...d,de->...e", x, params["project_out"], preferred_element_type=F32).astype(x.dtype)
    return jnp.einsum("...e,ve->...v", x, params["embed_tokens"], preferred_element_type=F32)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """HF OPT's positions: running count of real tokens minus one; pads get -1."""
    m = attention_mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m - 1


# ---- whole model ----------------------------------------------------------------------------
def forward_params(params: Params, tokens: jax.Array, config: OPTConfig,
                   attention_mask: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward. tokens: [B, T] int32; attention_mask: [B, T] (1 = real token,
    0 = left padding) or None. Returns logits [B, T, V] f32. Pure and differentiable."""
    B, T = tokens.shape
    mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    x = embed(params, tokens, positions_from_mask(mask))
    allowed = jnp.tril(jnp.ones((T, T), bool))[None] & (mask[:, None, :] > 0)
    for lp in params["layers"]:
        x, _ = decoder_layer(lp, x, None, allowed, 0, config=config)
    return lm_head(params, x, config)


def init_cache(config: OPTConfig, batch: int, max_len: int, dtype) -> list[LayerCache]:
    """Zeroed KV cache: per layer {"k", "v"}: [batch, H, max_len, hd]."""
    shape = (batch, config.num_attention_heads, max_len, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(config.num_hidden_layers)]


def forward_cached(params: Params, tokens: jax.Array, positions: jax.Array, cache: list[LayerCache],
                   kv_valid: jax.Array, write_index: jax.Array | int, config: OPTConfig, *,
                   layer_fn: Callable = decoder_layer, last_only: bool = True):
    """Run a chunk of T tokens against the KV cache (prefill: T = prompt; decode: T = 1).

    tokens, positions: [B, T] int32; kv_valid: [B, S] bool, the cache slots holding real tokens
    once this chunk is written (left pads stay False); the chunk occupies slots
    write_index .. write_index + T. Returns (logits [B, V] of the last position, or
    [B, T, V] with last_only=False; the updated cache).
    """
    T = tokens.shape[1]
    S = cache[0]["k"].shape[2]
    slot = jnp.arange(S)[None, :]
    query_slot = write_index + jnp.arange(T)[:, None]
    allowed = (slot <= query_slot)[None] & kv_valid[:, None, :]  # [B, T, S]
    x = embed(params, tokens, positions)
    new_cache = []
    for lp, layer_cache in zip(params["layers"], cache):
        x, layer_cache = layer_fn(lp, x, layer_cache, allowed, write_index, config=config)
        new_cache.append(layer_cache)
    if last_only:
        x = x[:, -1]
    return lm_head(params, x, config), new_cache


# ---- initialization and the model object -----------------------------------------------------
def init_params(config: OPTConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random OPT parameters (normal(0, std) weights, zero biases, unit LayerNorm scales)."""
    d, H, hd, F, E = (config.hidden_size, config.num_attention_heads, config.head_dim,
                      config.ffn_dim, config.word_embed_proj_dim)
    keys = iter(jax.random.split(key, 4 + 4 * config.num_hidden_layers))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, F32)).astype(dtype)

    def ln():
        return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}

    params: Params = {
        "embed_tokens": normal((config.vocab_size, E)),
        "embed_positions": normal((config.max_position_embeddings + POSITION_OFFSET, d)),
    }
    if config.has_projections:
        params["project_in"] = normal((E, d))
        params["project_out"] = normal((d, E))
    if config.has_final_layer_norm:
        params["final_layer_norm"] = ln()
    params["layers"] = [
        {
            "attn_ln": ln(),
            "attn": {"wqkv": normal((3, H, hd, d)), "bqkv": jnp.zeros((3, H, hd), dtype),
                     "wo_t": normal((H, hd, d)), "bo": jnp.zeros((d,), dtype)},
            "mlp_ln": ln(),
            "mlp": {"fc1": normal((F, d)), "b1": jnp.zeros((F,), dtype),
                    "fc2_t": normal((F, d)), "b2": jnp.zeros((d,), dtype)},
        }
        for _ in range(config.num_hidden_layers)
    ]
    return params


def param_shapes(config: OPTConfig, dtype=jnp.float32) -> Params:
    """The params pytree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OPTModel:
    """A loaded OPT: ``config`` (static under jit) and ``params`` (the pytree above).
    ``source`` is the directory it was loaded from (tokenizer files live there), if any."""

    config: OPTConfig = dataclasses.field(metadata=dict(static=True))
    params: Params
    source: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def dtype(self):
        return self.params["embed_tokens"].dtype

    def num_bytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))


def random_model(config: OPTConfig | str, dtype=jnp.bfloat16, seed: int = 0, std: float = 0.02) -> OPTModel:
    """An OPTModel with random normal(0, std) weights (unit LayerNorm scales, zero biases), for
    benchmarks on real shapes: ``random_model("opt-13b")``. Leaves are drawn one at a time, so
    peak memory is the model plus one f32 leaf."""
    from dejavu_jax.config import preset

    cfg = preset(config) if isinstance(config, str) else config
    shapes = param_shapes(cfg, dtype)
    normal = jax.jit(lambda k, shape: (std * jax.random.normal(k, shape, F32)).astype(dtype),
                     static_argnums=1)
    paths, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(jax.random.key(seed), len(paths))
    leaves = []
    for key, (path, s) in zip(keys, paths):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            leaves.append(jnp.ones(s.shape, dtype))
        elif s.ndim == 1 or name.endswith("['bqkv']"):
            leaves.append(jnp.zeros(s.shape, dtype))
        else:
            leaves.append(normal(key, s.shape))
    return OPTModel(cfg, jax.tree_util.tree_unflatten(treedef, leaves))
