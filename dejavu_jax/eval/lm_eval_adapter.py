"""lm-evaluation-harness adapter: an ``LM`` registered as ``"dejavu"`` (optional extra
``pip install dejavu-jax[lm-eval]``).

    python -m dejavu_jax.eval.lm_eval_adapter run --model dejavu \\
        --model_args pretrained=models/opt-gutenberg-6l,dtype=float32 \\
        --tasks my_task --include_path my_tasks/

or from Python, after ``import dejavu_jax.eval.lm_eval_adapter``,
``lm_eval.simple_evaluate(model="dejavu", model_args="pretrained=...", tasks=[...])``.

Model arguments: ``pretrained`` (HF OPT dir or orbax checkpoint; default the reference
model), ``dtype`` (float32 | bfloat16), ``batch_size``, ``max_length`` (default: the model's
positions), ``max_gen_toks``; sparse decoding for ``generate_until`` with ``predictors``
(a directory saved by ``dj.train_predictors``), ``mlp_density``, ``head_keep``.

Conventions follow lm-eval's Hugging Face model: a continuation's tokens are those of
``encode(context + continuation)`` after ``encode(context)`` (trailing spaces of the context
move to the continuation); OPT's ``</s>`` is prepended as BOS; contexts too long are cut on
the left. ``loglikelihood_rolling`` scores every token once with sliding windows of
``max_length`` tokens and stride ``max_length // 2`` (`dejavu_jax.eval.perplexity`).

Without lm_eval installed the class still works on plain request tuples (its methods accept
objects with ``.args`` or the tuples themselves); only the registration needs lm_eval.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dejavu_jax.errors import InputError

try:  # optional dependency
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:  # pragma: no cover - exercised where lm_eval is absent
    _LMBase, _register_model = object, None

BUCKET = 32  # scoring inputs are padded to a multiple of this length (few compiles)


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class DejavuLM(_LMBase):
    def __init__(self, pretrained: str | None = None, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 64, predictors: str | None = None,
                 mlp_density: float | None = None, head_keep: float | None = None, model=None,
                 tokenizer=None, **_ignored: Any):
        super().__init__()
        from dejavu_jax.checkpoint import load_opt, resolve_dtype
        from dejavu_jax.cli import resolve_model_dir
        from dejavu_jax.data.tokenizer import load_tokenizer

        if model is None:
            path = resolve_model_dir(pretrained)
            model = load_opt(path, dtype=resolve_dtype(dtype), progress=False)
        self.model = model
        self.tokenizer = tokenizer or load_tokenizer(model.source, check=False)
        cfg = model.config
        self.max_length = int(max_length or cfg.max_position_embeddings)
        if self.max_length > cfg.max_position_embeddings:
            raise InputError(f"max_length {self.max_length} exceeds the model's "
                             f"{cfg.max_position_embeddings} positions.")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.bos_id = cfg.bos_token_id
        self.decode_fn = None
        if predictors:
            from dejavu_jax.predictors import load_predictors
            from dejavu_jax.sparse import SparsityConfig, sparse_decode_fn

            pred = load_predictors(predictors, model)
            self.decode_fn = sparse_decode_fn(pred, SparsityConfig(
                mlp_density=None if mlp_density is None else float(mlp_density),
                head_keep=None if head_keep is None else float(head_keep)))

    # ---- helpers --------------------------------------------------------------------------
    def tok_encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return [self.bos_id] + ctx, whole[len(ctx):]

    @functools.cached_property
    def _score_jit(self):
        import jax

        from dejavu_jax.eval.perplexity import next_token_logprobs
        from dejavu_jax.model import forward_params

        cfg = self.model.config

        @jax.jit
        def score(params, tokens):
            logits = forward_params(params, tokens, cfg)
            logp = next_token_logprobs(logits, tokens)
            greedy = logits[:, :-1].argmax(-1) == tokens[:, 1:]
            return logp, greedy

        return score

    def _score(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """inputs [B, L] -> (log p(inputs[:, 1:]) [B, L - 1], greedy match [B, L - 1])."""
        logp, greedy = self._score_jit(self.model.params, inputs)
        return np.asarray(logp), np.asarray(greedy)

    # ---- the LM interface ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(context, continuation)] -> [(sum log p(continuation | context), is_greedy)]."""
        items = []
        for i, r in enumerate(requests):
            context, continuation = _args(r)[:2]
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise InputError(f"request {i}: the continuation {continuation!r} has no tokens.")
            seq = (ctx + cont)[-self.max_length:]
            if len(cont) >= len(seq):
                raise InputError(f"request {i}: the continuation alone fills the {self.max_length}-token "
                                 "window; no context is left to condition on.")
            items.append((i, seq, len(cont)))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        items.sort(key=lambda it: -len(it[1]))
        pad = self.model.config.pad_token_id
        for b in range(0, len(items), self.batch_size):
            chunk = items[b:b + self.batch_size]
            longest = max(len(seq) for _, seq, _ in chunk)
            L = min(-(-longest // BUCKET) * BUCKET, self.max_length)
            inputs = np.full((self.batch_size, L), pad, np.int32)
            for r, (_, seq, _) in enumerate(chunk):
                inputs[r, :len(seq)] = seq
            logp, greedy = self._score(inputs)  # position k scores seq[k + 1]
            for r, (i, seq, n_cont) in enumerate(chunk):
                sl = slice(len(seq) - 1 - n_cont, len(seq) - 1)
                results[i] = (float(logp[r, sl].sum()), bool(greedy[r, sl].all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[(text,)] -> [sum log p(text)] over all its tokens (after OPT's BOS)."""
        from dejavu_jax.eval.perplexity import jax_scorer, perplexity

        score = jax_scorer(self.model)
        out = []
        for r in requests:
            ids = np.asarray([self.bos_id] + self.tok_encode(_args(r)[0]), np.int32)
            if ids.size < 2:
                out.append(0.0)
                continue
            res = perplexity(score, ids, self.max_length, max(1, self.max_length // 2),
                             batch_size=self.batch_size, pad_id=self.model.config.pad_token_id)
            out.append(-res.nll_sum)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """[(context, {"until": [...], "max_gen_toks": n, "do_sample": bool, "temperature": t})]
        -> continuations, cut before the first stop string. Greedy unless do_sample."""
        from dejavu_jax.decode import dense_decode

        decode = self.decode_fn or dense_decode
        out: list[str] = []
        for r in requests:
            context, gen_kwargs = _args(r)[:2]
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            ids = [self.bos_id] + self.tok_encode(context)
            ids = ids[-(self.max_length - max_new):]
            tokens = decode(self.model, np.asarray([ids], np.int32), max_new,
                            temperature=temperature, eos_token_id=self.model.config.eos_token_id)
            new = np.asarray(tokens)[0, len(ids):]
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


if _register_model is not None:
    DejavuLM = _register_model("dejavu")(DejavuLM)


def main() -> None:
    """``python -m dejavu_jax.eval.lm_eval_adapter run --model dejavu --model_args ... --tasks ...``:
    lm_eval's own command line, with the ``dejavu`` model registered."""
    if _register_model is None:
        raise SystemExit("lm_eval is not installed: pip install 'dejavu-jax[lm-eval]' "
                         "(or pip install lm-eval -c constraints.txt).")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
