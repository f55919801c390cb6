"""The evaluation suite of a model directory: WikiText-2 test and held-out corpus perplexity,
for our JAX model and (optionally) for Hugging Face torch on the same checkpoint, plus the
unigram baseline. `evaluate` returns a flat dict that `dejavu eval` prints and the reference
model's figures file stores."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dejavu_jax.eval.perplexity import (PerplexityResult, jax_scorer, perplexity,
                                        unigram_perplexity)


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The whole text as one sequence with OPT's BOS, like ``tokenizer(text)`` in HF's recipe.
    Returns [N] int32."""
    return np.asarray(tokenizer(text)["input_ids"], np.int32)


def heldout_ids(corpus_dir: str | Path, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """The held-out books as one token stream (each book after BOS), first ``max_tokens``."""
    from dejavu_jax.data.corpus import corpus_files, encode_documents, read_books

    books = read_books(corpus_files(corpus_dir)["heldout"][0])
    ids = encode_documents(tokenizer, books).astype(np.int32)
    return ids[:max_tokens] if max_tokens else ids


def evaluate(model_dir: str | Path, *, wikitext: str | Path | None = None,
             corpus_dir: str | Path | None = None, heldout_max_tokens: int | None = None,
             context: int | None = None, stride: int | None = None, dtype: str = "float32",
             hf: bool = False, ours: bool = True, train_counts: np.ndarray | None = None,
             batch_size: int = 16, wikitext_max_tokens: int | None = None, progress: bool = True,
             log=print) -> dict:
    """Evaluate the OPT in ``model_dir`` (HF directory or orbax checkpoint).

    ``context`` defaults to the model's positions, ``stride`` to half of it. ``wikitext``: the
    raw WikiText-2 test file (None: the committed copy). ``corpus_dir``: also the held-out
    books. ``hf``: also score with `transformers` torch (needs torch); ``ours``: score with our
    JAX model (False: HF only). ``train_counts``: unigram counts for the baselines.
    ``*_max_tokens``: score only a prefix (quick checks). Returns {name: value}; keys
    ``wikitext2_ppl``, ``hf_wikitext2_ppl``, ``heldout_ppl``, ``unigram_wikitext2_ppl``, ...
    """
    from dejavu_jax.checkpoint import load_opt, resolve_dtype
    from dejavu_jax.data.tokenizer import check_tokenizer, load_tokenizer
    from dejavu_jax.data.wikitext import WIKITEXT2_TEST, wikitext2_text

    model = load_opt(model_dir, dtype=resolve_dtype(dtype), progress=False)
    cfg = model.config
    context = context or cfg.max_position_embeddings
    stride = stride or context // 2
    tok = load_tokenizer(model_dir, check=False)
    check_tokenizer(tok, cfg.vocab_size, source=str(model_dir), probe=False)
    texts = {"wikitext2": tokenize_text(tok, wikitext2_text(wikitext or WIKITEXT2_TEST))[:wikitext_max_tokens]}
    if corpus_dir is not None:
        texts["heldout"] = heldout_ids(corpus_dir, tok, heldout_max_tokens)
    scorers = {"": jax_scorer(model)} if ours else {}
    if hf:
        from dejavu_jax.eval.hf_torch import load_hf_model, torch_scorer

        scorers["hf_"] = torch_scorer(load_hf_model(model_dir, dtype))
    out: dict = {"eval_context": context, "eval_stride": stride, "eval_dtype": dtype}
    for name, ids in texts.items():
        out[f"{name}_tokens"] = int(ids.size)
        for prefix, score in scorers.items():
            t0 = time.perf_counter()
            r: PerplexityResult = perplexity(
                score, ids, context, stride, batch_size, cfg.pad_token_id,
                max_positions=cfg.max_position_embeddings, progress=progress,
                desc=f"{prefix or 'dejavu_'}{name}")
            out[f"{prefix}{name}_ppl"] = r.ppl
            log(f"{prefix or 'dejavu '}{name}: ppl {r.ppl:.3f} over {r.n_tokens:,} tokens "
                f"(context {context}, stride {stride}, {time.perf_counter() - t0:.1f} s)")
        if hf and ours:
            out[f"{name}_hf_rel_diff"] = abs(out[f"hf_{name}_ppl"] / out[f"{name}_ppl"] - 1)
    if train_counts is not None:
        out["unigram_wikitext2_ppl"] = unigram_perplexity(train_counts, texts["wikitext2"]).ppl
        if "heldout" in texts:
            out["unigram_heldout_ppl"] = unigram_perplexity(train_counts, texts["heldout"]).ppl
    return out
