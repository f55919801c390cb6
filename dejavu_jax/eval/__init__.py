"""Evaluation: sliding-window perplexity (ours and HF torch), unigram baseline, ReLU sparsity
facts, and an lm-evaluation-harness adapter (optional extra)."""

from dejavu_jax.eval.perplexity import (PerplexityResult, jax_scorer, model_perplexity,
                                        perplexity, sliding_windows, unigram_perplexity)

__all__ = ["PerplexityResult", "jax_scorer", "model_perplexity", "perplexity",
           "sliding_windows", "unigram_perplexity"]
