"""Autoregressive decoding: a jit-compiled prefill plus a `lax.while_loop` of one-token steps.

`generate_tokens` is the loop itself, generic over the step function, so `dense_decode`
(the baseline) and the sparse decoder share it: same sampling, padding, EOS and output.
Prompts are left-padded up to a multiple of ``PROMPT_BUCKET`` tokens, so prompts of
similar length share one compiled program; the extra padding is masked out and stripped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import InputError
from dejavu_jax.sampling import choose_tokens

PROMPT_BUCKET = 16

# step_fn(weights, tokens [B, T], positions [B, T], cache, kv_valid [B, S], write_index)
#   -> (logits [B, V] of the last position, cache, aux pytree of per-step statistics)
StepFn = Callable[..., tuple[jax.Array, Any, Any]]


def generate_tokens(step_fn: StepFn, prefill_fn: StepFn, weights: Any, prompt: jax.Array,
                    mask: jax.Array, key: jax.Array, cache: Any, *, max_new_tokens: int,
                    temperature: float, top_k: int | None, top_p: float | None,
                    eos_token_id: int | None, pad_token_id: int):
    """Decode inside jit. prompt, mask: [B, T] (left padded); ``cache`` sized T + max_new_tokens.

    Returns (new tokens [B, max_new_tokens] int32 (rows that hit EOS continue with
    pad_token_id), aux stacked over steps: leaves [max_new_tokens - 1, ...], or None).
    """
    B, T = prompt.shape
    kv_valid = jnp.concatenate([mask > 0, jnp.zeros((B, max_new_tokens), bool)], axis=1)
    positions = M.positions_from_mask(mask)
    logits, cache, aux0 = prefill_fn(weights, prompt, positions, cache, kv_valid, 0)
    pick = functools.partial(choose_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    first = pick(logits, jax.random.fold_in(key, 0))
    out = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(first)
    done = (first == eos_token_id) if eos_token_id is not None else jnp.zeros((B,), bool)
    pos = positions[:, -1] + 1

    # Per-step statistics: shaped like one step's aux, one row per step.
    aux_shape = jax.eval_shape(lambda: step_fn(weights, out[:, :1], pos[:, None], cache, kv_valid, T)[2])
    aux_buf = jax.tree.map(lambda s: jnp.zeros((max(max_new_tokens - 1, 0),) + s.shape, s.dtype), aux_shape)

    def cond(state):
        i, _, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, cache, kv_valid, pos, done, aux_buf = state
        slot = T + i - 1
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((B, 1), bool), (0, slot))
        prev = jax.lax.dynamic_slice(out, (0, i - 1), (B, 1))
        logits, cache, aux = step_fn(weights, prev, pos[:, None], cache, kv_valid, slot)
        tok = jnp.where(done, pad_token_id, pick(logits, jax.random.fold_in(key, i)))
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        if eos_token_id is not None:
            done = done | (tok == eos_token_id)
        aux_buf = jax.tree.map(lambda buf, a: buf.at[i - 1].set(a), aux_buf, aux)
        return i + 1, out, cache, kv_valid, pos + 1, done, aux_buf

    state = (jnp.int32(1), out, cache, kv_valid, pos, done, aux_buf)
    _, out, _, _, _, _, aux_buf = jax.lax.while_loop(cond, body, state)
    return out, aux_buf


def _dense_step(params, tokens, positions, cache, kv_valid, write_index, *, config):
    logits, cache = M.forward_cached(params, tokens, positions, cache, kv_valid, write_index, config)
    return logits, cache, None


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_token_id"))
def _dense_decode_jit(model: M.OPTModel, prompt, mask, key, *, max_new_tokens, temperature, top_k,
                      top_p, eos_token_id):
    cfg = model.config
    cache = M.init_cache(cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, model.dtype)
    step = functools.partial(_dense_step, config=cfg)
    out, _ = generate_tokens(step, step, model.params, prompt, mask, key, cache,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_token_id=eos_token_id, pad_token_id=cfg.pad_token_id)
    return out


# ---- input checks (concrete values, before jit) -------------------------------------------------
def prepare_prompt(config: OPTConfig, prompt_tokens, attention_mask, max_new_tokens: int,
                   bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate and left-pad to a bucket. Returns (tokens [B, Tb] int32, mask [B, Tb] int32,
    number of bucket pads added on the left)."""
    tokens = np.asarray(prompt_tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"prompt_tokens must be integer token ids of shape [batch, length] "
                         f"(or [length]); got shape {tokens.shape} dtype {tokens.dtype}.")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise InputError("the prompt is empty: give at least one token per row (OPT prompts "
                         "usually start with the BOS id 2).")
    if attention_mask is None:
        mask = np.ones((B, T), np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1 and B == 1:
            mask = mask[None]
        if mask.shape != (B, T):
            raise InputError(f"attention_mask has shape {mask.shape} but prompt_tokens has shape "
                             f"{(B, T)}; they must match (1 = token, 0 = left padding).")
        mask = (mask != 0).astype(np.int32)
        if np.any(np.diff(mask, axis=1) < 0):
            raise InputError("attention_mask must describe LEFT padding (zeros, then ones, per "
                             "row); pad prompts on the left, e.g. tokenizer.padding_side = 'left'.")
        if np.any(mask.sum(1) == 0):
            raise InputError(f"rows {np.flatnonzero(mask.sum(1) == 0).tolist()} of the prompt are "
                             "empty (attention_mask all zero); give each row at least one token.")
    real = tokens[mask > 0]
    if real.min() < 0 or real.max() >= config.vocab_size:
        bad = real[(real < 0) | (real >= config.vocab_size)]
        raise InputError(f"token ids {sorted(set(bad.tolist()))[:5]} are outside the vocabulary "
                         f"[0, {config.vocab_size}); was the prompt made with another tokenizer?")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    longest = int(mask.sum(1).max())
    if longest + max_new_tokens > config.max_position_embeddings:
        raise InputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{longest + max_new_tokens} exceeds the model's position table "
            f"(max_position_embeddings = {config.max_position_embeddings}); shorten the prompt "
            "or ask for fewer tokens.")
    extra = (-T) % bucket
    tokens = np.pad(tokens.astype(np.int32), ((0, 0), (extra, 0)), constant_values=config.pad_token_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)))
    tokens = np.where(mask > 0, tokens, config.pad_token_id).astype(np.int32)
    return tokens, mask, extra


def check_sampling(config: OPTConfig, temperature, top_k, top_p) -> None:
    if temperature is None or temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}.")
    if top_k is not None and not (1 <= top_k <= config.vocab_size):
        raise InputError(f"top_k must be in [1, {config.vocab_size}] or None, got {top_k!r}.")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p!r}.")


def dense_decode(model: M.OPTModel, prompt_tokens, max_new_tokens: int = 32, *,
                 attention_mask=None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0,
                 eos_token_id: int | None = None) -> jax.Array:
    """Generate with the dense model. prompt_tokens: [B, T] int (left padded, with
    attention_mask [B, T]: 1 = token, 0 = pad). Greedy when temperature == 0; otherwise
    samples with temperature / top_k / top_p from ``seed``. Rows that emit ``eos_token_id``
    continue with the pad id. Returns int32 [B, T + max_new_tokens] (prompt, then new tokens).
    """
    cfg = model.config
    check_sampling(cfg, temperature, top_k, top_p)
    tokens, mask, extra = prepare_prompt(cfg, prompt_tokens, attention_mask, max_new_tokens)
    new = _dense_decode_jit(model, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed),
                            max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                            top_k=top_k, top_p=top_p, eos_token_id=eos_token_id)
    return jnp.concatenate([jnp.asarray(tokens[:, extra:]), new], axis=1)


@jax.jit
def _forward_jit(model: M.OPTModel, tokens, mask):
    return M.forward_params(model.params, tokens, model.config, mask)


def forward(model: M.OPTModel, tokens, attention_mask=None) -> jax.Array:
    """Full-sequence logits [B, T, vocab] f32 for tokens [B, T] (attention_mask: 1 = token)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"tokens must be non-empty integer ids of shape [batch, length]; "
                         f"got shape {tokens.shape} dtype {tokens.dtype}.")
    cfg = model.config
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise InputError(f"token ids must be in [0, {cfg.vocab_size}); got range "
                         f"[{tokens.min()}, {tokens.max()}].")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise InputError(f"{tokens.shape[1]} tokens exceed max_position_embeddings "
                         f"{cfg.max_position_embeddings}; use a sliding window.")
    if attention_mask is None:
        mask = np.ones(tokens.shape, np.int32)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != tokens.shape:
            raise InputError(f"attention_mask has shape {mask.shape} but tokens have shape "
                             f"{tokens.shape}; they must match.")
    return _forward_jit(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))


# ---- text level ---------------------------------------------------------------------------------
def load_tokenizer(model_or_dir):
    """The tokenizer saved beside a model (``model.source``) or in a directory, via
    `transformers.AutoTokenizer`, set up for left padding."""
    from transformers import AutoTokenizer

    path = model_or_dir.source if isinstance(model_or_dir, M.OPTModel) else model_or_dir
    if path is None:
        raise InputError("this model has no directory to read a tokenizer from; pass "
                         "tokenizer=AutoTokenizer.from_pretrained(<dir with vocab.json, merges.txt>).")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise InputError(f"could not load a tokenizer from {path}: {e}") from None
    tok.padding_side = "left"
    return tok


def generate(model: M.OPTModel, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 32,
             decode_fn: Callable | None = None, **kwargs) -> list[str]:
    """Text in, text out: tokenizes ``prompts`` (left padded), runs ``decode_fn`` (default
    `dense_decode`; any function with its signature, e.g. a partial of `sparse_decode`), and
    returns each row's continuation (new text only, special tokens removed)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or any(not p for p in prompts):
        raise InputError("give one or more non-empty prompt strings.")
    tokenizer = tokenizer or load_tokenizer(model)
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="np", padding=True)
    kwargs.setdefault("eos_token_id", model.config.eos_token_id)
    out = (decode_fn or dense_decode)(model, enc["input_ids"], max_new_tokens,
                                      attention_mask=enc["attention_mask"], **kwargs)
    new = np.asarray(out)[:, enc["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
