"""ReLU sparsity facts of a trained OPT: the input the Deja Vu predictors build on.

For every layer, over the tokens of some text:

* ``zero_frac``: fraction of fc1 ReLU outputs that are exactly 0 (MLP neurons a token does not
  use), and its spread across tokens (mean, std, min, 5/50/95 percentiles, max of the
  per-token fraction);
* ``topk_share[k]``: how much of the MLP output the k neurons with the largest contribution
  carry. A token's MLP output (bias aside) is ``y = sum_i h_i fc2_t[i]`` with ``h = relu(...)``;
  keeping only the k neurons of largest ``h_i * ||fc2_t[i]||`` gives ``y_k``, and we report the
  mean over tokens of ``1 - ||y - y_k|| / ||y||`` (1 = nothing lost) for k a fraction of d_ff.

Activations are those of the model's own dtype (as loaded); the statistics are f32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.figures import save_figure

TOPK_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def mlp_activations(params: dict, tokens: jax.Array, config) -> list[jax.Array]:
    """fc1 ReLU outputs of every layer for tokens [B, T] int32: a list of [B, T, d_ff]."""
    captured: list[jax.Array] = []

    def capture_mlp(p, x):
        h = jax.nn.relu(M._linear(x, p["fc1"], "btd,fd->btf", p["b1"]))
        captured.append(h)
        return M._linear(h, p["fc2_t"], "btf,fd->btd", p["b2"])

    B, T = tokens.shape
    x = M.embed(params, tokens, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    for lp in params["layers"]:
        x, _ = M.decoder_layer(lp, x, None, allowed, 0, config=config, mlp_fn=capture_mlp)
    return captured


def sparsity_facts(model, tokens: np.ndarray, batch_size: int = 8,
                   topk_fractions: Sequence[float] = TOPK_FRACTIONS) -> dict:
    """Facts over ``tokens`` [n_windows, T] int32 (e.g. held-out windows). Returns
    {"tokens": N, "d_ff": F, "layers": [{"zero_frac": mean, "zero_frac_std", "zero_frac_min",
    "zero_frac_p05", "zero_frac_p50", "zero_frac_p95", "zero_frac_max",
    "topk_share": {k_fraction: mean kept fraction of ||y||}}, ...],
    "relu_zero_frac_per_layer": [...]}."""
    cfg, params = model.config, model.params
    F = cfg.ffn_dim
    ks = [max(1, int(round(f * F))) for f in topk_fractions]

    @jax.jit
    def batch_stats(params, toks):
        hs = mlp_activations(params, toks, cfg)
        out = []
        for lp, h in zip(params["layers"], hs):
            h = h.reshape(-1, F).astype(jnp.float32)
            w2 = lp["mlp"]["fc2_t"].astype(jnp.float32)  # [F, d]
            y = h @ w2
            y_norm = jnp.linalg.norm(y, axis=-1)
            score = h * jnp.linalg.norm(w2, axis=-1)
            ranked = jnp.sort(score, axis=-1)[:, ::-1]
            shares = []
            for k in ks:
                thresh = ranked[:, k - 1:k]
                keep = (score >= thresh) & (score > 0)
                y_k = jnp.where(keep, h, 0.0) @ w2
                err = jnp.linalg.norm(y - y_k, axis=-1) / jnp.maximum(y_norm, 1e-30)
                shares.append(jnp.where(y_norm > 0, 1.0 - err, 1.0))
            out.append((jnp.mean(h == 0, axis=-1), jnp.stack(shares, -1)))
        return out

    zeros = [[] for _ in range(cfg.num_hidden_layers)]
    shares = [[] for _ in range(cfg.num_hidden_layers)]
    tokens = np.asarray(tokens, np.int32)
    for i in range(0, len(tokens), batch_size):
        chunk = tokens[i:i + batch_size]
        if len(chunk) < batch_size:  # pad to one shape; drop the padding rows' stats
            pad = np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)
            chunk_in, n_real = np.concatenate([chunk, pad]), len(chunk) * tokens.shape[1]
        else:
            chunk_in, n_real = chunk, None
        for layer, (z, s) in enumerate(batch_stats(params, chunk_in)):
            zeros[layer].append(np.asarray(z)[:n_real])
            shares[layer].append(np.asarray(s)[:n_real])
    layers = []
    for layer in range(cfg.num_hidden_layers):
        z = np.concatenate(zeros[layer])
        s = np.concatenate(shares[layer]).mean(0)
        p05, p50, p95 = np.percentile(z, [5, 50, 95])
        layers.append({"zero_frac": float(z.mean()), "zero_frac_std": float(z.std()),
                       "zero_frac_min": float(z.min()), "zero_frac_p05": float(p05),
                       "zero_frac_p50": float(p50), "zero_frac_p95": float(p95),
                       "zero_frac_max": float(z.max()),
                       "topk_share": {str(f): float(v) for f, v in zip(topk_fractions, s)}})
    return {"tokens": int(tokens.size), "d_ff": F, "topk_fractions": list(topk_fractions),
            "layers": layers, "relu_zero_frac_per_layer": [l["zero_frac"] for l in layers]}


def plot_sparsity(facts: dict, path, title: str = "") -> None:
    """Two panels: per-layer zero fraction (mean and 5-95% band across tokens); kept share of
    the MLP output vs fraction of neurons kept, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = facts["layers"]
    idx = np.arange(len(layers))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    mean = [l["zero_frac"] for l in layers]
    a.fill_between(idx, [l["zero_frac_p05"] for l in layers], [l["zero_frac_p95"] for l in layers],
                   alpha=0.3, label="5-95% of tokens")
    a.plot(idx, mean, "o-", label="mean")
    a.set(xlabel="layer", ylabel="fraction of ReLU outputs == 0", ylim=(0, 1),
          title="MLP activation sparsity")
    a.set_xticks(idx)
    a.legend()
    fr = facts["topk_fractions"]
    for i, l in enumerate(layers):
        b.plot(fr, [l["topk_share"][str(f)] for f in fr], "o-", label=f"layer {i}")
    b.set(xlabel="fraction of d_ff neurons kept (top by |h_i| ||w2_i||)",
          ylabel="1 - ||y - y_k|| / ||y||", ylim=(0, 1.02), title="MLP output carried by top-k")
    b.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
