import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax import model as M
from dejavu_jax.config import OPTConfig
from dejavu_jax.predictors.modules import random_predictors
from dejavu_jax.sparse import SparsityConfig
from dejavu_jax.sparse_quality import best_settings, decode_perplexity, sweep, union_density

CFG = OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=48)


@pytest.fixture(scope="module")
def setup():
    model = M.random_model(CFG, jnp.float32, std=0.3, seed=2)
    windows = np.random.default_rng(0).integers(3, CFG.vocab_size, (3, 20))
    return model, windows, random_predictors(CFG, 8, block_size=8, dtype=jnp.float32)


def test_dense_decode_perplexity_equals_full_forward(setup):
    model, windows, _ = setup
    logits = M.forward_params(model.params, jnp.asarray(windows), CFG)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None], -1)
    np.testing.assert_allclose(decode_perplexity(model, windows), np.exp(nll.mean()), rtol=1e-5)


def test_full_density_sparse_perplexity_equals_dense(setup):
    model, windows, pred = setup
    dense = decode_perplexity(model, windows)
    for kv in ("all", "selected"):
        sp = SparsityConfig(mlp_density=1.0, head_keep=1.0, kv_policy=kv)
        np.testing.assert_allclose(decode_perplexity(model, windows, pred, sp), dense, rtol=1e-5)
    assert decode_perplexity(model, windows, pred, SparsityConfig(mlp_density=0.125, head_keep=0.5)) != dense


def test_sweep_writes_records(setup, tmp_path):
    model, windows, pred = setup
    grid = [dict(mlp_density=1.0, head_keep=1.0), dict(mlp_density=0.25, head_keep=0.5, kv_policy="selected")]
    recs = sweep(model, pred, windows, windows[:, :5], grid, out_dir=tmp_path, max_new_tokens=6, progress=False)
    assert (tmp_path / "sparse_quality.json").exists() and (tmp_path / "sparse_quality.png").exists()
    assert recs[0]["greedy_agreement"] == 1.0 and abs(recs[0]["rel_increase"]) < 1e-5
    assert recs[1]["bytes_fraction"] < recs[0]["bytes_fraction"] == pytest.approx(1.0)
    for key in ("mlp_density", "head_keep", "kv_policy", "ppl_dense", "ppl_sparse", "rel_increase", "greedy_agreement"):
        assert key in recs[1]
    assert best_settings(recs)["<= 1%"]["mlp_density"] == 1.0


def test_union_density_grows_from_the_row_budget(setup):
    model, windows, pred = setup
    prompts = np.random.default_rng(1).integers(3, CFG.vocab_size, (4, 6))
    recs = union_density(model, pred, prompts, batches=(1, 4), settings=({"mlp_density": 0.25, "head_keep": 0.5},),
                         max_new_tokens=4)
    one, four = recs
    assert one["mean_union_mlp_density"] == pytest.approx(one["mean_row_mlp_density"]) == pytest.approx(16 / 64)
    assert one["mean_union_head_density"] == pytest.approx(0.5)
    assert one["mean_row_mlp_density"] <= four["mean_union_mlp_density"] <= 1.0
    assert 0.5 <= four["mean_union_head_density"] <= 1.0
    assert len(four["union_mlp_density"]) == CFG.num_hidden_layers
    with pytest.raises(ValueError, match="needs 8 prompts"):
        union_density(model, pred, prompts, batches=(8,))


def test_sweep_counts_what_a_threshold_used(setup, tmp_path):
    """A threshold's k is only its cap: the record carries the density its steps used and
    its bytes come from that (a threshold above every score reads no MLP rows)."""
    model, windows, pred = setup
    grid = [dict(mlp_density=1.0, head_keep=1.0), dict(mlp_density=1.0, mlp_threshold=1e30, head_keep=1.0)]
    fixed, thr = sweep(model, pred, windows, windows[:, :5], grid, out_dir=tmp_path, max_new_tokens=4, progress=False)
    assert "used_mlp_density" not in fixed and fixed["mlp_threshold"] is None
    assert thr["mlp_threshold"] == 1e30 and thr["used_mlp_density"] == 0.0 and thr["used_head_density"] == 1.0
    assert thr["mean_mlp_density"] == 0.0 and thr["bytes_fraction"] < fixed["bytes_fraction"]


def test_merge_keeps_every_texts_records_and_plots_a_panel_a_text(setup, tmp_path, load_script):
    """`run_sparse_quality.py --merge`: runs over different texts (or prefixes) -> one file with
    every run's records (each with its text; no run-level grids, which would describe only one
    run), written one record a line, and one plot panel a text; merging it again keeps them."""
    model, windows, pred = setup
    rq = load_script("run_sparse_quality")
    grids = {"a": [dict(mlp_density=1.0, head_keep=1.0)], "b": [dict(mlp_density=0.25, head_keep=0.5)]}
    paths = []
    for name, grid in grids.items():
        recs = sweep(model, pred, windows, windows[:, :5], grid, out_dir=tmp_path / name, max_new_tokens=3,
                     progress=False)
        run = {"model": "m", "summary": {name: "s", "meaningful_text": name, "note": "n"}, "speed": {}, "grid": grid,
               "grid_other_texts": [], "texts": {name: {"prefix": 1}}, "timings_s": {name: 1.0},
               "records": [dict(r, text=name) for r in recs]}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    assert rq.merge([str(p) for p in paths], tmp_path / "out", tmp_path / "no_bench.json") == 0
    text = (tmp_path / "out" / "sparse_quality.json").read_text()
    merged = json.loads(text)
    assert [(r["text"], r["mlp_density"], r["head_keep"]) for r in merged["records"]] == [
        (name, g["mlp_density"], g["head_keep"]) for name, grid in grids.items() for g in grid]
    assert set(merged["texts"]) == set(grids) and "grid" not in merged and "grid_other_texts" not in merged
    assert sum(line.startswith('{"mlp_density"') for line in text.splitlines()) == len(merged["records"])  # a line each
    assert rq.merge([str(tmp_path / "out" / "sparse_quality.json")], tmp_path / "again", tmp_path / "x.json") == 0
    again = json.loads((tmp_path / "again" / "sparse_quality.json").read_text())
    assert again["records"] == merged["records"] and again["texts"] == merged["texts"]
    from PIL import Image
    with Image.open(tmp_path / "out" / "sparse_quality.png") as im:
        assert im.mode == "P" and im.size[0] > im.size[1]  # two panels side by side
