"""Sliding-window perplexity (the usual Hugging Face protocol) and a unigram baseline.

Protocol, for a token sequence ``ids`` of length N scored with windows of ``context`` tokens
moved by ``stride``: window w covers ``ids[b : e]`` with ``b = w * stride`` and
``e = min(b + context, N)``; it scores the targets ``ids[j]`` for ``j`` in
``[max(e_prev, b + 1), e)`` (``e_prev``: the previous window's end), each predicted from the
window's tokens before it. With ``stride < context`` every token but the first is scored
exactly once, with at least ``context - stride`` tokens of left context; with
``stride == context`` (disjoint windows) each window's first token has no context inside
its window and is not scored, as in Hugging Face's recipe. Perplexity is
``exp(sum of NLL / number of scored tokens)`` (token-weighted, not a mean of window means).

A scorer is ``score_fn(inputs [B, C] int32) -> log p(inputs[:, 1:]) [B, C - 1] float``;
`jax_scorer` builds one for an `OPTModel`, `dejavu_jax.eval.hf_torch.torch_scorer` for a
Hugging Face model. Windows are batched and padded to one shape (right padding does not
change a causal model's earlier outputs), so a jit-compiled scorer compiles once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from dejavu_jax.errors import InputError

ScoreFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float  # natural log
    n_tokens: int  # scored tokens
    context: int
    stride: int
    n_windows: int

    @property
    def nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "n_tokens": self.n_tokens,
                "context": self.context, "stride": self.stride, "n_windows": self.n_windows}


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; see the module docstring."""
    if context < 2:
        raise InputError(f"context {context} is too short; it must be at least 2 tokens.")
    if not 1 <= stride <= context:
        raise InputError(f"stride {stride} must be between 1 and the context length {context}.")
    if n_tokens < 2:
        raise InputError(f"the text has {n_tokens} token(s); perplexity needs at least 2.")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        windows.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def window_batches(ids: np.ndarray, windows: list, batch_size: int, context: int,
                   pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Yield (inputs [batch_size, context] int32, weights [batch_size, context - 1] f32 (1 where
    the target inputs[:, k + 1] is scored), number of real windows in the batch)."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        inputs = np.full((batch_size, context), pad_id, np.int32)
        weights = np.zeros((batch_size, context - 1), np.float32)
        for r, (b, e, first) in enumerate(chunk):
            inputs[r, :e - b] = ids[b:e]
            weights[r, first - b - 1:e - b - 1] = 1.0
        yield inputs, weights, len(chunk)


def perplexity(score_fn: ScoreFn, ids, context: int, stride: int | None = None,
               batch_size: int = 8, pad_id: int = 1, max_positions: int | None = None,
               progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` ([N] ints) under ``score_fn``.

    ``stride`` defaults to ``context // 2``. ``max_positions``: the model's position table
    size; a longer ``context`` raises `InputError`.
    """
    ids = np.asarray(ids).reshape(-1)
    stride = context // 2 if stride is None else stride
    if max_positions is not None and context > max_positions:
        raise InputError(
            f"context {context} is longer than the model's {max_positions} positions "
            f"(max_position_embeddings); use --context {max_positions} or less.")
    windows = sliding_windows(ids.size, context, stride)
    nll_sum, n = 0.0, 0
    batches = window_batches(ids, windows, batch_size, context, pad_id)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(windows) / batch_size), desc=desc, unit="batch")
    for inputs, weights, _ in batches:
        logp = np.asarray(score_fn(inputs), dtype=np.float64)
        nll_sum -= float((logp * weights).sum())
        n += int(weights.sum())
    return PerplexityResult(nll_sum, n, context, stride, len(windows))


def next_token_logprobs(logits, inputs):
    """logits [B, C, V] (any float), inputs [B, C] -> log p(inputs[:, 1:]) [B, C - 1] f32 (jnp)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, inputs[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]


def jax_scorer(model=None, *, params=None, config=None,
               logits_fn: Callable | None = None) -> ScoreFn:
    """A jit-compiled scorer for an `OPTModel` (or ``params`` + ``config``), or for any
    ``logits_fn(tokens [B, C] int32) -> logits [B, C, V]`` written in JAX. f32 matmuls run at
    full f32 precision (no TF32 on GPUs), as torch's do by default."""
    import jax

    def exact(fn):
        def run(*a):
            with jax.default_matmul_precision("highest"):
                return np.asarray(fn(*a))
        return run

    if logits_fn is None:
        from dejavu_jax.model import forward_params

        if model is not None:
            params, config = model.params, model.config
        if params is None or config is None:
            raise InputError("jax_scorer needs a model, params + config, or a logits_fn.")

        @jax.jit
        def score(p, tokens):
            return next_token_logprobs(forward_params(p, tokens, config), tokens)

        run = exact(score)
        return lambda inputs: run(params, inputs)

    return exact(jax.jit(lambda tokens: next_token_logprobs(logits_fn(tokens), tokens)))


def model_perplexity(model, ids, context: int | None = None, stride: int | None = None,
                     batch_size: int = 8, progress: bool = False, desc: str = "perplexity"):
    """`perplexity` of an `OPTModel` (context defaults to its position table size)."""
    cfg = model.config
    context = cfg.max_position_embeddings if context is None else context
    return perplexity(jax_scorer(model), ids, context, stride, batch_size, cfg.pad_token_id,
                      max_positions=cfg.max_position_embeddings, progress=progress, desc=desc)


def unigram_perplexity(counts: np.ndarray, ids, smoothing: float = 1.0) -> PerplexityResult:
    """Perplexity of ``ids[1:]`` (the tokens the sliding window scores) under a unigram model
    p(t) = (counts[t] + smoothing) / (sum(counts) + smoothing * len(counts)): the baseline a
    model that ignores context cannot beat. ``counts``: [vocab] token counts of training text."""
    ids = np.asarray(ids).reshape(-1)
    counts = np.asarray(counts, np.float64)
    if ids.max(initial=0) >= counts.size:
        raise InputError(f"token id {ids.max()} is outside the {counts.size} unigram counts.")
    logp = np.log(counts + smoothing) - math.log(counts.sum() + smoothing * counts.size)
    targets = ids[1:]
    return PerplexityResult(float(-logp[targets].sum()), int(targets.size), 0, 0, 0)
