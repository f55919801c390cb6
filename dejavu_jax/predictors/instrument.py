"""An instrumented OPT forward: the dense model's layers, recorded, optionally masked.

Every layer runs through `dejavu_jax.model.decoder_layer` itself; its ``attention_fn`` /
``mlp_fn`` hooks are replaced by versions that (1) record what the predictors learn from
and (2) optionally zero the outputs of heads / neurons a selector did not keep (the paper's
"mask-only" mode: the dense computation with outputs masked, used for oracle curves and
for predictor-in-the-loop perplexity). With no selector the output equals
`model.forward_params` bit for bit (tests check it).

Per layer l and position, ``records`` hold (B = batch, T = tokens, d = hidden, F = ffn, H = heads):

    attn_in   [B, T, d]  model dtype   the layer's residual input (before attn_ln)
    mlp_in    [B, T, d]  model dtype   the residual entering the MLP block (before mlp_ln)
    mlp_act   [B, T, F]  model dtype   fc1 output after ReLU (neuron i active iff > 0)
    head_norm [B, T, H]  f32           ||softmax(q k^T) v||_2 of each head, before out_proj

Selectors decide, per layer, which units to keep. ``select_heads(layer, head_norm, rec)``
returns a [B, T, H] bool mask and ``select_neurons(layer, mlp_act, rec)`` a [B, T, F] bool
mask (or None: keep all); ``rec`` holds the layer's records so far plus ``prev_attn_in``
(layer l-1's attention input; layer 0's own for layer 0), so a lookahead predictor can use it.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig

F32 = jnp.float32
Records = dict[str, jax.Array]
HeadSelector = Callable[[int, jax.Array, Records], Optional[jax.Array]]
NeuronSelector = Callable[[int, jax.Array, Records], Optional[jax.Array]]
RECORD_FIELDS = ("attn_in", "mlp_in", "mlp_act", "head_norm")


def _linear(x: jax.Array, w: jax.Array, spec: str, b: jax.Array) -> jax.Array:
    """As model.py's: einsum with f32 accumulation, bias in f32, result in x.dtype."""
    y = jnp.einsum(spec, x, w, preferred_element_type=F32) + b.astype(F32)
    return y.astype(x.dtype)


def instrumented_layer(lp: M.Params, x: jax.Array, allowed: jax.Array, layer: int, prev_attn_in: jax.Array,
                       *, config: OPTConfig, select_heads: HeadSelector | None = None,
                       select_neurons: NeuronSelector | None = None) -> tuple[jax.Array, Records]:
    """One decoder layer over a full sequence (no KV cache). x: [B, T, d]; allowed: [B, T, T].
    Returns (layer output [B, T, d], records of this layer; see the module docstring)."""
    rec: Records = {"attn_in": x, "prev_attn_in": prev_attn_in}
    pre = config.do_layer_norm_before

    def attention_fn(p, h, cache, allowed, write_index, *, config):
        q, k, v = M.qkv_projection(p, h, config.head_dim)
        o = M.attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed)  # [B, T, H, hd]
        rec["head_norm"] = jnp.sqrt(jnp.sum(jnp.square(o.astype(F32)), axis=-1))
        if select_heads is not None:
            keep = select_heads(layer, rec["head_norm"], rec)
            if keep is not None:
                o = jnp.where(keep[..., None], o, jnp.zeros((), o.dtype))
        out = M.out_projection(p, o)
        if pre:  # decoder_layer adds it to the residual next: the same sum, the same dtype
            rec["mlp_in"] = x + out
        return out, cache

    def mlp_fn(p, h):
        if not pre:  # post-LayerNorm (opt-350m): the MLP reads the residual itself
            rec["mlp_in"] = h
        act = jax.nn.relu(_linear(h, p["fc1"], "btd,fd->btf", p["b1"]))
        rec["mlp_act"] = act
        if select_neurons is not None:
            keep = select_neurons(layer, act, rec)
            if keep is not None:
                act = jnp.where(keep, act, jnp.zeros((), act.dtype))
        return _linear(act, p["fc2_t"], "btf,fd->btd", p["b2"])

    x, _ = M.decoder_layer(lp, x, None, allowed, 0, config=config, attention_fn=attention_fn, mlp_fn=mlp_fn)
    return x, rec


def run_layers(params: M.Params, tokens: jax.Array, config: OPTConfig, *,
               on_layer: Callable[[int, Records], None] | None = None,
               select_heads: HeadSelector | None = None,
               select_neurons: NeuronSelector | None = None) -> jax.Array:
    """Full-sequence forward (no padding) through `instrumented_layer`. tokens: [B, T] int32.
    ``on_layer(l, records)`` sees each layer's records (call it to gather what you need, so
    only that is kept alive). Returns logits [B, T, V] f32."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = M.embed(params, tokens, positions)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    prev = x
    for l, lp in enumerate(params["layers"]):
        x_in = x
        x, rec = instrumented_layer(lp, x, allowed, l, prev, config=config, select_heads=select_heads,
                                    select_neurons=select_neurons)
        if on_layer is not None:
            on_layer(l, rec)
        prev = x_in
    return M.lm_head(params, x, config)


# ---- top-k masks -----------------------------------------------------------------------------
def top_k_mask(scores: jax.Array, k) -> jax.Array:
    """[..., n] -> bool [..., n], True at the k largest entries of each row (ties at the k-th
    value are all kept; for ReLU outputs with fewer than k positives every zero is 'kept',
    which changes nothing). ``k``: a Python int (uses lax.top_k) or a traced int scalar in
    [1, n] (uses a sort; one compiled program serves every k)."""
    n = scores.shape[-1]
    if isinstance(k, (int, np.integer)):
        if k >= n:
            return jnp.ones(scores.shape, bool)
        if k <= 0:
            return jnp.zeros(scores.shape, bool)
        kth = jax.lax.top_k(scores, int(k))[0][..., -1:]
    else:
        kth = jnp.take(jnp.sort(scores, axis=-1), jnp.clip(n - k, 0, n - 1), axis=-1)[..., None]
    return scores >= kth


def oracle_selectors(mlp_k: tuple[int, ...] | None, head_k: tuple[int, ...] | None):
    """Selectors keeping the truly largest units per token: layer l's top ``mlp_k[l]`` fc1
    activations and top ``head_k[l]`` heads by output norm (None: keep all)."""
    heads = None if head_k is None else (lambda l, norm, rec: top_k_mask(norm, head_k[l]))
    neurons = None if mlp_k is None else (lambda l, act, rec: top_k_mask(act.astype(F32), mlp_k[l]))
    return heads, neurons
