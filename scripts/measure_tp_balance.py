"""How evenly do the selected neurons and heads spread over tensor-parallel devices?

CPU, 8 simulated devices. Writes benchmarks/results/tp_balance.json (+ .png):

1. the reference model's own activations on held-out text: the oracle global top-k of each
   position (MLP density 10%, half the heads), split over tp = 2, 4, 8 contiguous blocks:
   max/mean selected per device, before and after an offline balanced permutation (fit on
   the first half of the positions, measured on the second), and what the balanced
   per-device top-k loses against the global top-k (mass recall);
2. `tp_sparse_decode(selection="global")` on a random model with random predictors: the
   per-device counts it reports, batch 1 and 8;
3. with --predictors: the same decode on the reference model with its trained predictors.

    python scripts/measure_tp_balance.py [--predictors DIR] [--out benchmarks/results]
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dejavu_jax.figures import save_figure  # noqa: E402

TPS = (2, 4, 8)


def decode_balance(model, pred, prompts, sparsity, new_tokens):
    from dejavu_jax import parallel as par
    from dejavu_jax.parallel.balance import summarize

    out = {}
    for tp in TPS:
        mesh = par.make_mesh(tp)
        rows = {"mlp": [], "head": []}
        for prompt in prompts:
            _, stats = par.tp_sparse_decode(model, pred, prompt, new_tokens, mesh=mesh, sparsity=sparsity,
                                            selection="global", return_stats=True)
            for kind in rows:  # [steps, tp, L] -> [steps, L, tp]
                rows[kind].append(np.moveaxis(np.asarray(stats[f"{kind}_selected"]), 1, -1))
        out[str(tp)] = {f"{kind}_imbalance": summarize(np.concatenate(r)) for kind, r in rows.items()}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "opt-gutenberg-6l"))
    ap.add_argument("--heldout", default=str(REPO.parent / "shared" / "data" / "corpus" / "heldout.txt.xz"))
    ap.add_argument("--predictors", default=None, help="trained predictors of --model (optional)")
    ap.add_argument("--positions", type=int, default=4096, help="held-out positions for the oracle")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--head-keep", type=float, default=0.5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    import dejavu_jax as dj
    from dejavu_jax.bench import environment
    from dejavu_jax.config import OPTConfig
    from dejavu_jax.model import random_model
    from dejavu_jax.parallel.balance import layer_activations, oracle_balance
    from dejavu_jax.predictors.modules import random_predictors
    from dejavu_jax.predictors.tokens import load_token_stream

    model = dj.load_opt(args.model, jnp.float32, progress=False)
    cfg = model.config
    T = 256
    stream = np.asarray(load_token_stream(args.heldout, tokenizer_dir=args.model, max_tokens=args.positions))
    tokens = stream[: (len(stream) // T) * T].reshape(-1, T)
    acts, norms = layer_activations(model, tokens)
    k_mlp = math.ceil(args.density * cfg.ffn_dim)
    k_head = math.ceil(args.head_keep * cfg.num_attention_heads)
    result = {
        "what": "max/mean of the selected units per tensor-parallel device (1.0 = balanced)",
        **environment(),
        "reference_oracle": {
            "model": Path(args.model).name, "positions": int(tokens.size), "mlp_k": k_mlp, "head_k": k_head,
            "note": "oracle global top-k of the true ReLU outputs / head-output norms at every held-out "
                    "position, all layers; permutation fit on the first half of the positions",
            "mlp": oracle_balance(acts, k_mlp, TPS), "heads": oracle_balance(norms, k_head, TPS)},
    }
    sp = dj.SparsityConfig(mlp_density=args.density, head_keep=args.head_keep)
    rcfg = OPTConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=8,
                     max_position_embeddings=128)
    rmodel = random_model(rcfg, jnp.float32, std=0.05)
    rpred = random_predictors(rcfg, 32, block_size=8, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    result["random_model_decode"] = {
        "config": "d=256, H=8, F=1024, 4 layers, random weights and random rank-32 predictors",
        "batch_1": decode_balance(rmodel, rpred, [rng.integers(4, 512, (1, 16)) for _ in range(2)], sp, 32),
        "batch_8": decode_balance(rmodel, rpred, [rng.integers(4, 512, (8, 16))], sp, 32)}
    if args.predictors:
        pred = dj.load_predictors(args.predictors, model)
        prompts = [tokens[i:i + 1, :32] for i in range(0, min(len(tokens), 8))]
        result["reference_predictors_decode"] = {
            "predictors": str(args.predictors), "prompts": len(prompts), "new_tokens": 32,
            **decode_balance(model, pred, prompts, sp, 32)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tp_balance.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "tp_balance.png")
    print(json.dumps({tp: {k: [v["mean"], v["work_ratio"]] for k, v in r.items() if isinstance(v, dict)}
                      for tp, r in result["reference_oracle"]["mlp"].items()}))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = {"MLP, global top-k (reference, oracle)": ("reference_oracle", "mlp", "global_topk_imbalance"),
              "MLP, after balanced permutation": ("reference_oracle", "mlp", "permuted_imbalance"),
              "heads, global top-k (reference, oracle)": ("reference_oracle", "heads", "global_topk_imbalance")}
    if "reference_predictors_decode" in result:
        series["MLP, trained predictors (decode, batch 1)"] = ("reference_predictors_decode", None, "mlp_imbalance")
    x = np.arange(len(TPS))
    w = 0.8 / (len(series) + 1)
    for i, (label, (a, b, c)) in enumerate(series.items()):
        src = result[a] if b is None else result[a][b]
        ax.bar(x + i * w, [src[str(tp)][c]["mean"] for tp in TPS], w, label=label)
    ax.bar(x + len(series) * w, [1.0] * len(TPS), w, label="per-device top-k (by construction)", color="0.6")
    ax.set_xticks(x + w * len(series) / 2, [f"tp={tp}" for tp in TPS])
    ax.set_ylabel("max / mean selected per device")
    ax.set_ylim(0.9, None)
    ax.legend(fontsize=8)
    ax.set_title("Balance of the selected units across devices")
    fig.tight_layout()
    save_figure(fig, path, dpi=120, colors=32)  # flat bars


if __name__ == "__main__":
    main()
