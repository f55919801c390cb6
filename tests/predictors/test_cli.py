"""The CLI registration and the pipeline script, end to end on a tiny random model."""

import json
from pathlib import Path

import numpy as np

from dejavu_jax.predictors import load_predictors
from dejavu_jax.predictors.cli import load_model
from dejavu_jax.predictors.tokens import tokenize_text

REPO = Path(__file__).resolve().parents[2]


def test_subcommands_are_registered():
    from dejavu_jax.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["collect", "--model", "random:tiny", "--tokens", "t.npy", "--out", "o"])
    assert args.func.__name__ == "run_collect_cli"
    args = parser.parse_args(["train-predictors", "--activations", "a", "--rank", "8"])
    assert args.func.__name__ == "run_train_cli" and args.rank == 8
    args = parser.parse_args(["analyze", "--activations", "a", "--eval-tokens", "t.npy"])
    assert args.func.__name__ == "run_analyze_cli"


def test_pipeline_script_end_to_end(tmp_path, load_script):
    script = load_script("run_predictor_pipeline")
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 512, 12000).astype(np.uint16))
    results, pred_dir = tmp_path / "results", tmp_path / "pred"
    assert script.main(["--model", "random:tiny", "--tokens", str(tokens), "--max-tokens", "10000",
                        "--heldout-max-tokens", "2000", "--seq-len", "32", "--positions-per-seq", "8", "--ranks", "4,8",
                        "--epochs", "2", "--batch-size", "128", "--eval-windows", "4", "--work", str(tmp_path / "w"),
                        "--results", str(results), "--predictors-out", str(pred_dir), "--no-progress"]) == 0
    out = json.loads((results / "predictors.json").read_text())
    for key in ("layer", "mlp_k", "mlp_density", "mlp_recall", "mlp_mass_recall", "head_k", "head_recall",
                "lookahead", "predictor_bytes_frac"):
        assert all(key in r for r in out["layers"])
    assert {"density", "ppl"} <= set(out["oracle_curve"][0])
    assert out["rank"] in (4, 8) and len(out["rank_sweep"]) == 2 and out["same_layer"]
    for name in ("oracle.json", "oracle_ppl.png", "predictors_recall.png", "predictors_ppl.png"):
        assert (results / name).exists()
    pred = load_predictors(pred_dir, load_model("random:tiny"))
    assert pred.rank == out["rank"] and list(pred.mlp_k) == [r["mlp_k"] for r in out["layers"]]


def test_text_is_tokenized_like_the_training_cache():
    # the reference model ships OPT's tokenizer files (the same as ../shared/data/tokenizer/opt)
    ids = tokenize_text("Hello world.\n\x1e\nSecond book.", REPO / "models" / "opt-gutenberg-6l")
    assert ids[0] == 2 and list(ids).count(2) == 2 and ids.dtype == np.int32
