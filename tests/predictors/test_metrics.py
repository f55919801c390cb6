"""Recall curves, calibration and cost on small hand-checked cases."""

import numpy as np

from dejavu_jax.config import preset
from dejavu_jax.predictors import metrics as MT


def test_mlp_curves_by_hand():
    act = np.array([[3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    scores = np.array([[0.5, 0.9, 0.1, -1.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    c = MT.mlp_curves(scores, act)
    # row 0 order: n1 (0), n0 (3), n2 (1), n3 (0); row 1 has nothing active: recall 1
    np.testing.assert_allclose(c["active_recall"], [(0 + 1) / 2, (0.5 + 1) / 2, 1, 1])
    np.testing.assert_allclose(c["mass_recall"], [0.5, (0.75 + 1) / 2, 1, 1])
    assert c["active_fraction"] == 2 / 8
    assert np.isclose(c["threshold_recall"], (1.0 + 1.0) / 2)  # scores > 0 keeps n0, n2 in row 0
    assert np.isclose(c["threshold_density"], (3 / 4 + 1) / 2)


def test_head_curves_by_hand():
    norms = np.array([[1.0, 5.0, 2.0, 4.0]])
    scores = np.array([[0.0, 3.0, 2.0, 1.0]])  # predicted order: 1, 2, 3, 0; true top-2: heads 1, 3
    c = MT.head_curves(scores, norms, label_k=2)
    np.testing.assert_allclose(c["label_recall"], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(c["mass_recall"], np.cumsum([5, 2, 4, 1]) / 12)


def test_calibrate_k_rounds_to_blocks():
    curve = np.linspace(0.5, 1.0, 100)
    assert MT.calibrate_k(curve, 0.9, block=1) == 81
    assert MT.calibrate_k(curve, 0.9, block=16) == 96
    assert MT.calibrate_k(curve, 1.1, block=16) == 100
    assert MT.default_block_size(1024) == 32 and MT.default_block_size(20480) == 128


def test_cost_at_opt13b():
    cfg = preset("opt-13b")
    c = MT.cost_fractions(cfg, rank=256, head_rank=40)
    d, F = 5120, 20480
    want = (256 * (d + F) + F + 40 * (d + 40) + 40) / (4 * d * d + 2 * d * F + 9 * d + F)
    assert np.isclose(c["bytes_frac"], want) and c["bytes_frac"] < 0.03
