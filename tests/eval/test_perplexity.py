"""Sliding-window perplexity equals a direct computation; WikiText-2 text follows the HF
recipe; unigram baseline; HF torch agrees with ours; clear errors."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.errors import InputError
from dejavu_jax.eval.perplexity import (jax_scorer, model_perplexity, perplexity,
                                        sliding_windows, unigram_perplexity)
from dejavu_jax.model import OPTModel
from dejavu_jax.training import tiny_model_config

CFG = tiny_model_config(vocab_size=320, max_position_embeddings=32)


@pytest.fixture(scope="module")
def tiny_model():
    return OPTModel(CFG, M.init_params(CFG, jax.random.key(0), std=0.3))


def direct_nll(model, ids, context, stride):
    """Written out plainly: each window run on its own, its new targets scored."""
    total, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = np.asarray(ids[begin:end])[None]
        logp = jax.nn.log_softmax(M.forward_params(model.params, window, CFG)[0], -1)
        for j in range(max(prev_end, begin + 1), end):
            total -= float(logp[j - begin - 1, ids[j]])
            n += 1
        prev_end = end
        if end == len(ids):
            break
    return total, n


@pytest.mark.parametrize("n,context,stride", [(50, 16, 8), (50, 16, 16), (40, 32, 5), (20, 32, 16)])
def test_sliding_window_equals_direct_computation(tiny_model, n, context, stride):
    ids = np.random.default_rng(n).integers(0, 300, n)
    r = perplexity(jax_scorer(tiny_model), ids, context, stride, batch_size=3)
    total, count = direct_nll(tiny_model, ids, context, stride)
    assert r.n_tokens == count == (n - 1 if stride < context else n - math.ceil(n / context))
    assert r.nll_sum == pytest.approx(total, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_every_token_scored_once_with_enough_context():
    for n, c, s in [(1000, 64, 32), (64, 64, 1), (999, 100, 7), (1000, 64, 64)]:
        seen = []
        for b, e, first in sliding_windows(n, c, s):
            assert first - b >= min(c - s, first)  # left context of the first scored token
            seen += range(first, e)
        unscored = set(range(0, n, c)) if s == c else {0}  # disjoint windows: their first tokens
        assert seen == [j for j in range(n) if j not in unscored]


def test_model_perplexity_and_context_errors(tiny_model):
    ids = np.arange(100) % 300
    assert model_perplexity(tiny_model, ids, 16, 8).n_tokens == 99
    with pytest.raises(InputError, match="longer than the model's 32 positions"):
        model_perplexity(tiny_model, ids, context=64)
    with pytest.raises(InputError, match="stride"):
        sliding_windows(100, 16, 17)
    with pytest.raises(InputError, match="at least 2"):
        sliding_windows(1, 16, 8)


def test_unigram_baseline():
    counts = np.array([3, 1, 0, 6])
    ids = np.array([0, 3, 3, 1, 2])
    p = (counts + 1) / (counts.sum() + 4)
    expect = math.exp(-np.mean(np.log(p[[3, 3, 1, 2]])))
    assert unigram_perplexity(counts, ids).ppl == pytest.approx(expect)


def test_wikitext2_text_follows_the_hf_recipe(opt_tokenizer_dir):
    from dejavu_jax.data import load_tokenizer
    from dejavu_jax.data.wikitext import wikitext2_rows, wikitext2_text

    rows = wikitext2_rows()
    assert len(rows) == 4358 and rows[:2] == ["", " = Robert Boulter = \n"]
    assert sum(r == "" for r in rows) == 1467
    text = wikitext2_text()
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    # the well-known count of the HF recipe (287,644 with GPT-2) plus OPT's BOS
    assert len(load_tokenizer(opt_tokenizer_dir)(text)["input_ids"]) == 287645


def test_hf_torch_agrees_and_evaluate_suite(tiny_opt_dir, tmp_path):
    from dejavu_jax.eval.suite import evaluate

    text = tmp_path / "wiki.raw"
    text.write_text(" = Title = \n \n The quick brown fox jumps over the lazy dog . Hello world .\n" * 3)
    out = evaluate(tiny_opt_dir("pre_ln"), wikitext=text, context=16, stride=8, hf=True,
                   train_counts=np.ones(320), progress=False, log=lambda *a: None)
    assert out["wikitext2_hf_rel_diff"] < 1e-5
    assert out["unigram_wikitext2_ppl"] == pytest.approx(320, rel=1e-6)
    assert out["eval_context"] == 16 and out["wikitext2_tokens"] > 40


def test_dejavu_eval_cli(tiny_opt_dir, tmp_path, capsys):
    import json

    from dejavu_jax.eval.cli import main

    text = tmp_path / "wiki.raw"
    text.write_text(" = Title = \n \n Hello world , hello there ! The quick brown fox .\n" * 4)
    out = tmp_path / "r.json"
    args = ["--model", str(tiny_opt_dir("pre_ln")), "--wikitext", str(text), "--stride", "16"]
    assert main(args + ["--context", "32", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["eval_context"] == 32 and res["wikitext2_ppl"] > 1
    assert main(args + ["--context", "128"]) == 2
    assert "longer than the model's 64 positions" in capsys.readouterr().err
