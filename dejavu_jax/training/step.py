"""The training step: bf16 forward on f32 master weights, chunked cross-entropy, AdamW.

State is a plain dict ``{"params": f32 pytree, "opt_state": optax state, "step": int32 []}``.
The optimizer is optax's AdamW taken apart (clip by global norm -> scale_by_adam ->
decoupled weight decay), with the learning rate passed into the step as a scalar, so the
schedule (`learning_rate`) can be fixed after the first steps are timed and is stored
with the checkpoint. Weight decay applies to the weight matrices and embeddings only.

Data parallel: the batch is sharded over a 1-D mesh axis ``"data"`` (every local device),
params and optimizer state are replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.training.config import TrainConfig

F32 = jnp.float32
DECAYED = ("embed_tokens", "embed_positions", "wqkv", "wo_t", "fc1", "fc2_t", "project_in",
           "project_out")


# ---- model pieces ---------------------------------------------------------------------------
def init_train_params(config: OPTConfig, key: jax.Array, std: float = 0.02) -> dict:
    """f32 params: normal(0, std) weights, and the two residual-branch outputs (out_proj,
    fc2) scaled by 1/sqrt(2 L) as in GPT-2, so the residual stream starts at unit scale."""
    params = M.init_params(config, key, jnp.float32, std=std)
    scale = 1.0 / math.sqrt(2 * config.num_hidden_layers)
    for lp in params["layers"]:
        lp["attn"]["wo_t"] = lp["attn"]["wo_t"] * scale
        lp["mlp"]["fc2_t"] = lp["mlp"]["fc2_t"] * scale
    return params


def final_hidden(params: dict, tokens: jax.Array, config: OPTConfig) -> jax.Array:
    """The hidden state the LM head reads (after the final LayerNorm and project_out):
    tokens [B, T] int32 -> [B, T, E] in the params' dtype. ``lm_logits(params, this)`` equals
    `dejavu_jax.model.forward_params`."""
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = M.embed(params, tokens, positions)
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    for lp in params["layers"]:
        x, _ = M.decoder_layer(lp, x, None, allowed, 0, config=config)
    if "final_layer_norm" in params:
        x = M.layer_norm(params["final_layer_norm"], x, config.layer_norm_eps)
    if "project_out" in params:
        x = jnp.einsum("btd,de->bte", x, params["project_out"], preferred_element_type=F32).astype(x.dtype)
    return x


def cross_entropy(hidden: jax.Array, embed: jax.Array, targets: jax.Array,
                  chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL and token count. hidden: [B, T, E]; embed: [V, E] (tied head);
    targets: [B, T] int32 (-1 = not scored). Logits are f32. With ``chunk`` > 0 the positions
    are processed ``chunk`` at a time under `jax.checkpoint`, so only one [B, chunk, V] logits
    block is ever live (recomputed in the backward pass)."""
    B, T, E = hidden.shape

    def block(h, t):
        logits = jnp.einsum("bte,ve->btv", h, embed, preferred_element_type=F32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        valid = t >= 0
        return jnp.sum(jnp.where(valid, lse - tgt, 0.0)), jnp.sum(valid)

    if not chunk or chunk >= T:
        return block(hidden, targets)
    if T % chunk:
        raise ValueError(f"loss_chunk {chunk} must divide the sequence length {T}.")
    hs = hidden.reshape(B, T // chunk, chunk, E).swapaxes(0, 1)
    ts = targets.reshape(B, T // chunk, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda carry, xt: (jax.tree.map(jnp.add, carry, block(*xt)), None))
    (nll, n), _ = jax.lax.scan(body, (jnp.zeros((), F32), jnp.zeros((), jnp.int32)), (hs, ts))
    return nll, n


def loss_fn(params: dict, batch: jax.Array, config: OPTConfig, compute_dtype=jnp.bfloat16,
            chunk: int = 0) -> jax.Array:
    """Mean next-token NLL (nats) of ``batch`` [B, T + 1] int32 (inputs batch[:, :-1], targets
    batch[:, 1:]). Params are cast to ``compute_dtype`` for the forward; the loss is f32."""
    p = jax.tree.map(lambda a: a.astype(compute_dtype), params)
    hidden = final_hidden(p, batch[:, :-1], config)
    nll, n = cross_entropy(hidden, p["embed_tokens"], batch[:, 1:], chunk)
    return nll / n


# ---- optimizer and schedule -------------------------------------------------------------------
def decay_mask(params: dict) -> dict:
    """True for leaves under weight decay (matrices and embeddings; not biases, LayerNorms)."""
    def is_decayed(path, _):
        last = path[-1]
        return getattr(last, "key", None) in DECAYED
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(tc: TrainConfig, params: dict) -> optax.GradientTransformation:
    """AdamW without its learning rate (applied in the step): updates are Adam directions
    plus weight_decay x params, to be scaled by -lr."""
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.scale_by_adam(b1=tc.b1, b2=tc.b2, eps=tc.eps),
        optax.add_decayed_weights(tc.weight_decay, mask=decay_mask(params)),
    )


def learning_rate(step: int, tc: TrainConfig, total_steps: int) -> float:
    """Linear warmup to peak_lr over warmup_steps, then cosine decay to min_lr_ratio x peak
    at total_steps (held there after)."""
    if step < tc.warmup_steps:
        return tc.peak_lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total_steps - tc.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return tc.peak_lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


# ---- state, sharding, jit ---------------------------------------------------------------------
def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every local device)."""
    devices = list(jax.local_devices() if devices is None else devices)
    return Mesh(np.array(devices), ("data",))


def init_state(config: OPTConfig, tc: TrainConfig, mesh: Mesh) -> dict:
    """Fresh state, replicated over the mesh."""
    params = init_train_params(config, jax.random.key(tc.seed), tc.init_std)
    state = {"params": params, "opt_state": make_optimizer(tc, params).init(params),
             "step": jnp.zeros((), jnp.int32)}
    return jax.device_put(state, NamedSharding(mesh, P()))


def abstract_state(config: OPTConfig, tc: TrainConfig, mesh: Mesh) -> Any:
    """The state's shapes/dtypes/shardings without allocating it (the target of a restore)."""
    replicated = NamedSharding(mesh, P())
    shapes = jax.eval_shape(lambda: {
        "params": (p := init_train_params(config, jax.random.key(0), tc.init_std)),
        "opt_state": make_optimizer(tc, p).init(p), "step": jnp.zeros((), jnp.int32)})
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def make_train_step(config: OPTConfig, tc: TrainConfig, mesh: Mesh):
    """jit-compiled ``step(state, batch [B, T + 1] int32, lr f32 []) -> (state, metrics)``;
    metrics: {"loss", "grad_norm"} f32 scalars. The state buffers are donated."""
    compute = jnp.dtype(tc.compute_dtype)
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def step(state, batch, lr):
        params = state["params"]
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, config, compute, tc.loss_chunk)
        tx = make_optimizer(tc, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, in_shardings=(replicated, batch_sharding, None),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def make_eval_step(config: OPTConfig, tc: TrainConfig, mesh: Mesh):
    """jit-compiled ``eval(params, batch [B, T + 1]) -> mean NLL`` (same dtype as training)."""
    compute = jnp.dtype(tc.compute_dtype)
    replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(lambda params, batch: loss_fn(params, batch, config, compute, tc.loss_chunk),
                   in_shardings=(replicated, batch_sharding), out_shardings=replicated)
