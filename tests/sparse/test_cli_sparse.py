"""`dejavu generate --sparse [--compare]` end to end on a tiny saved model with saved predictors."""

import shutil

import pytest

import jax.numpy as jnp

from dejavu_jax.checkpoint import load_opt
from dejavu_jax.cli import main
from dejavu_jax.predictors.modules import random_predictors
from dejavu_jax.predictors.saving import save_predictors


@pytest.mark.parametrize("extra", [[], ["--mlp-threshold=-1e30"]])
def test_generate_sparse_compare(tiny_opt_dir, tmp_path, capsys, extra):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_opt_dir(), model_dir)
    model = load_opt(model_dir)
    # full density with every head (or a threshold below every score, found by compaction):
    # the sparse tokens must equal the dense ones
    pred = random_predictors(model.config, 8, mlp_density=1.0, head_keep=1.0, block_size=16, dtype=jnp.float32)
    save_predictors(pred, model_dir / "predictors", model.config)
    rc = main(["generate", "--model", str(model_dir), "--sparse", "--compare", "--max-new-tokens", "6",
               "--prompt", "hello world", "--mlp-density", "1.0", "--head-keep", "1.0", *extra])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    dense = [ln for ln in out if ln.startswith("[dense] hello")]
    sparse = [ln for ln in out if ln.startswith("[sparse] hello")]
    assert len(dense) == 1 and dense[0].replace("[dense]", "") == sparse[0].replace("[sparse]", "")
    assert any("tokens/s" in ln and ln.startswith("[sparse]") for ln in out)


def test_generate_sparse_without_predictors_is_a_clear_error(tiny_opt_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_opt_dir(), model_dir)
    rc = main(["generate", "--model", str(model_dir), "--sparse", "--max-new-tokens", "2"])
    assert rc == 2
    assert "no predictors" in capsys.readouterr().err
