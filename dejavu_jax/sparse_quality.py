"""Quality of sparse decoding measured through the real decode path (KV effects included).

`decode_perplexity` feeds the true tokens one at a time through a decode step function
(teacher forcing): dense prefill of a short prefix, then one step per token, so the sparse
step's head choices, KV policy and sparse kernels all act exactly as in generation. Each row
of the batch is its own window, decoded with ``batch_mode="per_row"`` so every row behaves
as a batch-1 decode. `greedy_agreement` compares sparse and dense greedy continuations.
`sweep` runs both over a grid and writes ``sparse_quality.json`` plus a Pareto plot.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import model as M
from dejavu_jax.decode import dense_decode
from dejavu_jax.predictors.modules import Predictors
from dejavu_jax.sparse import (SparsityConfig, _prefill, check_predictors, init_sparse_cache, sparse_decode,
                               sparse_step)
from dejavu_jax.figures import save_figure


def _dense_step(weights, tokens, positions, cache, kv_valid, slot, *, config):
    params, _ = weights
    logits, cache = M.forward_cached(params, tokens, positions, cache, kv_valid, slot, config)
    return logits, cache, None


@functools.partial(jax.jit, static_argnames=("config", "sparsity", "budgets", "prefix"))
def _nll(params, predictors, windows, *, config, sparsity, budgets, prefix):
    """Per-token NLL [B, T - prefix] of windows [B, T] decoded step by step."""
    B, T = windows.shape
    policy = sparsity.kv_policy if sparsity is not None else "all"
    cache = init_sparse_cache(config, B, T, params["embed_tokens"].dtype, policy)
    if sparsity is None:
        cache = [{"k": c["k"], "v": c["v"]} for c in cache]
        step = functools.partial(_dense_step, config=config)
    else:
        step = functools.partial(sparse_step, config=config, sparsity=sparsity, budgets=budgets)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    slots = jnp.arange(T)
    kv_valid = jnp.broadcast_to(slots < prefix, (B, T))
    logits, cache, _ = _prefill((params, predictors), windows[:, :prefix], positions[:, :prefix], cache, kv_valid,
                                0, config=config)

    def nll_of(logits, target):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), target[:, None], -1)[:, 0]

    first = nll_of(logits, windows[:, prefix])

    def body(cache, t):
        valid = jnp.broadcast_to(slots <= t, (B, T))
        tok = jax.lax.dynamic_slice(windows, (0, t), (B, 1))
        pos = jax.lax.dynamic_slice(positions, (0, t), (B, 1))
        logits, cache, _ = step((params, predictors), tok, pos, cache, valid, t)
        return cache, nll_of(logits, jax.lax.dynamic_slice(windows, (0, t + 1), (B, 1))[:, 0])

    _, rest = jax.lax.scan(body, cache, jnp.arange(prefix, T - 1))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def decode_perplexity(model: M.OPTModel, windows: np.ndarray, predictors: Predictors | None = None,
                      sparsity: SparsityConfig | None = None, prefix: int = 1) -> float:
    """Perplexity of windows [B, T] (each scored from token ``prefix`` on) when decoded
    token by token: dense steps if ``sparsity`` is None, else sparse steps (per_row)."""
    budgets = None
    if sparsity is not None:
        sparsity = SparsityConfig(**{**sparsity.__dict__, "batch_mode": "per_row"})
        check_predictors(model, predictors, sparsity)
        budgets = sparsity.layer_budgets(model.config, predictors)
        predictors = predictors.astype(model.dtype)
    nll = _nll(model.params, predictors, jnp.asarray(windows, jnp.int32), config=model.config,
               sparsity=sparsity, budgets=budgets, prefix=prefix)
    return float(np.exp(np.mean(np.asarray(nll, np.float64))))


def greedy_agreement(model: M.OPTModel, predictors: Predictors, sparsity: SparsityConfig, prompts: np.ndarray,
                     max_new_tokens: int = 32, dense_out: np.ndarray | None = None) -> dict:
    """Greedy continuations of prompts [B, P] with sparse vs dense decoding: the share of
    generated positions where they agree, and the mean length of the common prefix."""
    sparsity = SparsityConfig(**{**sparsity.__dict__, "batch_mode": "per_row"})
    P = prompts.shape[1]
    dense = np.asarray(dense_decode(model, prompts, max_new_tokens))[:, P:] if dense_out is None else dense_out
    sparse = np.asarray(sparse_decode(model, predictors, prompts, max_new_tokens, sparsity=sparsity))[:, P:]
    same = dense == sparse
    prefix = np.where(same.all(1), max_new_tokens, np.argmin(same, axis=1))
    out = {"greedy_agreement": float(same.mean()), "greedy_common_prefix": float(prefix.mean()), "dense": dense}
    if sparsity.mlp_threshold is not None:
        # a threshold's sets vary with the token (fixed-k sets use their k): the densities a
        # row's steps use, from batch-1 decodes of the first prompts (a batch's are its union's)
        used = [sparse_decode(model, predictors, prompts[i:i + 1], max_new_tokens, sparsity=sparsity,
                              return_stats=True)[1] for i in range(min(4, len(prompts)))]
        out.update(used_mlp_density=float(np.mean([u["mlp_density"] for u in used])),
                   used_head_density=float(np.mean([u["head_density"] for u in used])))
    return out


def sweep(model: M.OPTModel, predictors: Predictors, windows: np.ndarray, prompts: np.ndarray, grid: list[dict],
          out_dir: str | Path = "benchmarks/results", max_new_tokens: int = 32, progress: bool = True,
          prefix: int = 1) -> list[dict]:
    """Perplexity (windows scored from token ``prefix`` on) and greedy agreement for each
    setting of ``grid`` (SparsityConfig kwargs); writes sparse_quality.json and .png."""
    from tqdm import tqdm

    ppl_dense = decode_perplexity(model, windows, prefix=prefix)
    dense_out = None
    records = []
    for setting in tqdm(grid, disable=not progress, desc="sparse quality"):
        sp = SparsityConfig(lookahead=predictors.lookahead, **setting)
        ppl = decode_perplexity(model, windows, predictors, sp, prefix=prefix)
        agree = greedy_agreement(model, predictors, sp, prompts, max_new_tokens, dense_out)
        dense_out = agree.pop("dense")
        mlp_k, head_k = sp.layer_budgets(model.config, predictors)
        if sp.mlp_threshold is not None:  # a threshold's k is only its cap: count what it used
            cfg = model.config
            mlp_k = [agree["used_mlp_density"] * cfg.ffn_dim] * cfg.num_hidden_layers
            head_k = [agree["used_head_density"] * cfg.num_attention_heads] * cfg.num_hidden_layers
        records.append(dict(
            mlp_density=setting.get("mlp_density"), head_keep=setting.get("head_keep"), kv_policy=sp.kv_policy,
            mlp_threshold=sp.mlp_threshold,
            dense_layers=list(sp.dense_layers), mean_mlp_density=float(np.mean(mlp_k)) / model.config.ffn_dim,
            mean_head_density=float(np.mean(head_k)) / model.config.num_attention_heads,
            bytes_fraction=bytes_fraction(model.config, mlp_k, head_k, sp.kv_policy),
            ppl_dense=ppl_dense, ppl_sparse=ppl, rel_increase=ppl / ppl_dense - 1.0,
            tokens_scored=int(windows.shape[0] * (windows.shape[1] - prefix)), **agree))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "sparse_quality.json").write_text(json.dumps(records, indent=1))
        r = records[-1]
        tqdm.write(f"mlp_density={r['mlp_density']} head_keep={r['head_keep']} kv={r['kv_policy']} "
                   f"dense_layers={r['dense_layers']}: ppl {ppl:.3f} ({100 * r['rel_increase']:+.2f}%), "
                   f"greedy agreement {r['greedy_agreement']:.3f}, bytes {r['bytes_fraction']:.3f}")
    plot(records, Path(out_dir) / "sparse_quality.png")
    return records


def bytes_fraction(config, mlp_k, head_k, kv_policy) -> float:
    """Share of a decode step's layer weight bytes that the sparse step reads (attention:
    q and out of kept heads, K/V of all heads or of kept heads; MLP: kept neurons)."""
    d, F, H = config.hidden_size, config.ffn_dim, config.num_attention_heads
    total = sparse = 0.0
    for mk, hk in zip(mlp_k, head_k):
        h = hk / H
        attn = d * d * (2 * h + (2 if kv_policy == "all" else 2 * h))
        total += 4 * d * d + 2 * d * F
        sparse += attn + 2 * d * mk
    return sparse / total


def plot(records: list[dict], path: Path) -> None:
    """Perplexity increase against the bytes-read bound; one panel per record "text" (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r.get("text") for r in records))
    cols = min(2, len(texts))  # two panels a row
    rows = -(-len(texts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(texts):]:
        ax.axis("off")
    for ax, text in zip(axes.flat, texts):
        sc = None
        for policy, marker in (("all", "o"), ("selected", "s")):
            pts = [r for r in records if r["kv_policy"] == policy and r.get("text") == text]
            if not pts:
                continue
            sc = ax.scatter([1 / r["bytes_fraction"] for r in pts], [100 * r["rel_increase"] for r in pts],
                            c=[r["mean_head_density"] for r in pts], cmap="viridis", marker=marker,
                            label=f"K/V: {policy}", vmin=0, vmax=1)
        for r in records:  # points whose setting the GPU benchmark measured at the OPT-13B shape
            m = r.get("measured_opt-13b_batch1")
            if m and r.get("text") == text and r["mlp_density"] != 1.0:
                ax.annotate(f"{m['speedup_vs_dense']:.2f}x measured\n(OPT-13B, H100)",
                            (1 / r["bytes_fraction"], 100 * r["rel_increase"]), fontsize=7,
                            xytext=(-75, -24), textcoords="offset points")
        if sc is not None:
            fig.colorbar(sc, ax=ax, label="heads kept")
        ax.axhline(1.0, color="r", ls="--", lw=0.8, label="+1% perplexity")
        ax.axhline(2.0, color="orange", ls=":", lw=0.8, label="+2%")
        ax.set_yscale("symlog", linthresh=5, linscale=2)
        top = max([100 * r["rel_increase"] for r in records if r.get("text") == text] + [5])
        ax.set_ylim(-1, top * 2)
        ticks = [0, 1, 2, 5] + [t for t in (10, 100, 1000, 10000) if t < top * 2]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("bytes-read speedup bound (1 / fraction of layer weights read)")
        ax.set_ylabel("perplexity increase over dense (%)")
        ax.set_title("sparse decode quality vs speed" + (f" ({text})" if text else " (reference model)"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80, colors=32)
    plt.close(fig)


def best_settings(records: list[dict], limits=(0.01, 0.02)) -> dict:
    """For each perplexity-loss limit, the setting with the fewest bytes read within it."""
    out = {}
    for lim in limits:
        ok = [r for r in records if r["rel_increase"] <= lim]
        out[f"<= {lim:.0%}"] = min(ok, key=lambda r: r["bytes_fraction"]) if ok else None
    return out


def union_density(model: M.OPTModel, predictors: Predictors, prompts: np.ndarray, batches=(1, 4, 16, 64),
                  settings=({},), max_new_tokens: int = 32) -> list[dict]:
    """How union sparsity holds up as the batch grows, with real predictors on real prompts.

    For each batch size B and setting (SparsityConfig kwargs; {} = the calibrated sets), decode
    the first B ``prompts`` [N, P] with ``batch_mode="union"`` and record the densities the
    union actually used (`sparse_decode`'s stats, mean over steps): per layer and overall,
    beside the per-row budget the setting asks for."""
    out = []
    for setting in settings:
        sp = SparsityConfig(lookahead=predictors.lookahead, batch_mode="union", **setting)
        mlp_k, head_k = sp.layer_budgets(model.config, predictors)
        for B in batches:
            if B > prompts.shape[0]:
                raise ValueError(f"batch {B} needs {B} prompts; got {prompts.shape[0]}.")
            _, stats = sparse_decode(model, predictors, prompts[:B], max_new_tokens, sparsity=sp, return_stats=True)
            mlp = np.asarray(stats["mlp_density"], np.float64).mean(0)
            heads = np.asarray(stats["head_density"], np.float64).mean(0)
            out.append(dict(batch=B, mlp_density=setting.get("mlp_density"), head_keep=setting.get("head_keep"),
                            dense_layers=list(sp.dense_layers),
                            row_mlp_density=[k / model.config.ffn_dim for k in mlp_k],
                            row_head_density=[k / model.config.num_attention_heads for k in head_k],
                            union_mlp_density=mlp.tolist(), union_head_density=heads.tolist(),
                            mean_row_mlp_density=float(np.mean(mlp_k)) / model.config.ffn_dim,
                            mean_union_mlp_density=float(mlp.mean()),
                            mean_union_head_density=float(heads.mean()), new_tokens=max_new_tokens))
    return out

