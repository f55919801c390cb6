"""On data whose active set is a known low-rank function of the input, training finds it."""

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax.predictors import metrics as MT
from dejavu_jax.predictors.train import TrainSettings, _scores_np, fit_stacked


def _synthetic(n, d=32, F=256, H=8, true_rank=4, seed=0):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((2, n, d)) + 1).astype(np.float32)  # a residual stream: any scale
    z = x - x.mean(-1, keepdims=True)
    z = z / np.sqrt((z * z).mean(-1, keepdims=True))  # the layer reads it through a LayerNorm
    u = rng.standard_normal((2, d, true_rank)) / np.sqrt(d)
    v = rng.standard_normal((2, true_rank, F))
    pre = np.einsum("lnd,ldr,lrf->lnf", z, u, v) - 1.2  # about 25% active
    act = np.maximum(pre, 0).astype(np.float32)
    a = rng.standard_normal((2, d, H)) / np.sqrt(d)
    norms = np.exp(np.einsum("lnd,ldh->lnh", z, a)).astype(np.float32)  # monotone in a linear score
    return x, act, norms


def test_mlp_and_head_predictors_reach_high_recall():
    x, act, norms = _synthetic(6000)
    xv, actv, normsv = (a[:, 5000:] for a in (x, act, norms))
    x, act, norms = (a[:, :5000] for a in (x, act, norms))
    F, H = act.shape[-1], norms.shape[-1]
    bits, bitsv = np.packbits(act > 0, axis=-1), np.packbits(actv > 0, axis=-1)
    s = TrainSettings(batch_size=256, max_epochs=15, patience=3, lr=1e-2, head_lr=1e-2)  # few steps: a high lr
    mlp, hist = fit_stacked(jax.random.key(0), jnp.asarray(x), jnp.asarray(bits), jnp.asarray(xv), jnp.asarray(bitsv),
                            kind="bits", n=F, rank=8, label_k=2, k_eval=int(0.2 * F), lr=s.lr, s=s, progress=False)
    scores = _scores_np(mlp, xv)
    for l in range(2):
        c = MT.mlp_curves(scores[l], actv[l])
        k = int(round(1.5 * c["active_fraction"] * F))
        assert MT.value_at(c["active_recall"], k) > 0.95, (l, MT.value_at(c["active_recall"], k))
        assert MT.value_at(c["mass_recall"], k) > 0.98
    head, _ = fit_stacked(jax.random.key(1), jnp.asarray(x), jnp.asarray(norms), jnp.asarray(xv), jnp.asarray(normsv),
                          kind="topk", n=H, rank=H, label_k=2, k_eval=2, lr=s.head_lr, s=s, progress=False)
    hs = _scores_np(head, xv)
    for l in range(2):
        hc = MT.head_curves(hs[l], normsv[l], 2)
        assert hc["label_recall"][1] > 0.85, hc["label_recall"]
        assert hc["label_recall"][3] > 0.97
