"""The lm-evaluation-harness adapter: its methods against direct computations, and (where
lm_eval is installed) a local multiple-choice / generation / perplexity task from files."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dejavu_jax.eval.lm_eval_adapter import DejavuLM
from dejavu_jax.model import forward_params


@pytest.fixture(scope="module")
def lm(tiny_opt_dir):
    return DejavuLM(pretrained=str(tiny_opt_dir("pre_ln")), dtype="float32", batch_size=3)


def direct_logprob(lm, context: str, continuation: str) -> tuple[float, bool]:
    ctx = [2] + lm.tok_encode(context)
    cont = lm.tok_encode(context + continuation)[len(lm.tok_encode(context)):]
    seq = np.array([ctx + cont], np.int32)
    logits = forward_params(lm.model.params, seq, lm.model.config)[0]
    logp = jax.nn.log_softmax(logits, -1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    total = sum(float(logp[p, seq[0, p + 1]]) for p in pos)
    greedy = all(int(logits[p].argmax()) == seq[0, p + 1] for p in pos)
    return total, greedy


def test_loglikelihood_equals_direct(lm):
    reqs = [("The quick brown", " fox"), ("Hello", " world, hello there!"), ("", "Once upon"),
            ("Deja vu: contextual sparsity for efficient language models at inference", " time."),
            ("A small model ", "that predicted tokens")]
    got = lm.loglikelihood(reqs)
    for (c, x), (lp, g) in zip(reqs, got):
        want_lp, want_g = direct_logprob(lm, c.rstrip() if c.endswith(" ") else c,
                                         (c[len(c.rstrip()):] + x))
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-5)
        assert g == want_g


def test_loglikelihood_rolling_equals_sum_of_token_logprobs(lm):
    text = "Once upon a time, in a land far away, there lived a small model."
    (got,) = lm.loglikelihood_rolling([(text,)])
    ids = np.array([[2] + lm.tok_encode(text)], np.int32)
    assert ids.shape[1] < 64  # one window: a plain full-sequence sum
    logp = jax.nn.log_softmax(forward_params(lm.model.params, ids, lm.model.config)[0], -1)
    want = sum(float(logp[k, ids[0, k + 1]]) for k in range(ids.shape[1] - 1))
    assert got == pytest.approx(want, rel=1e-5)
    long_text = text * 6  # longer than the 64 positions: sliding windows
    (long_lp,) = lm.loglikelihood_rolling([(long_text,)])
    assert np.isfinite(long_lp) and long_lp < got


def test_generate_until_is_greedy_and_stops(lm):
    from dejavu_jax.decode import dense_decode

    (full,) = lm.generate_until([("The quick brown", {"until": [], "max_gen_toks": 12})])
    ids = np.array([[2] + lm.tok_encode("The quick brown")], np.int32)
    new = np.asarray(dense_decode(lm.model, ids, 12, eos_token_id=2))[0, ids.shape[1]:]
    assert full == lm.tokenizer.decode(new, skip_special_tokens=True)
    if len(full) > 3:
        stop = full[2:4]
        (cut,) = lm.generate_until([("The quick brown", {"until": [stop], "max_gen_toks": 12})])
        assert cut == full[:full.index(stop)]


def test_lm_eval_local_task(tiny_opt_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # local files only, never the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    docs = [{"question": "The quick brown fox jumps over the lazy", "choices": [" dog", " cat"], "label": 0},
            {"question": "Hello world, hello", "choices": [" there", " where"], "label": 0},
            {"question": "Once upon a", "choices": [" time", " land"], "label": 0}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
    (tmp_path / "mc.yaml").write_text("task: dejavu_local_mc\n" + common + """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    (tmp_path / "ppl.yaml").write_text("task: dejavu_local_ppl\n" + common + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list:
  - metric: word_perplexity
""")
    (tmp_path / "gen.yaml").write_text("task: dejavu_local_gen\n" + common + """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{choices[0]}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
    out = lm_eval.simple_evaluate(
        model="dejavu", model_args=f"pretrained={tiny_opt_dir('pre_ln')},dtype=float32",
        tasks=["dejavu_local_mc", "dejavu_local_ppl", "dejavu_local_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)), batch_size=2, log_samples=False)
    res = out["results"]
    assert 0.0 <= res["dejavu_local_mc"]["acc,none"] <= 1.0
    assert res["dejavu_local_ppl"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in res["dejavu_local_gen"]
