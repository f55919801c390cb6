#!/usr/bin/env python3
"""Union sparsity vs batch size on the reference model, with its trained predictors (issue 7, item 5).

    python scripts/measure_union_density.py --text .carry/tokens/heldout.npy

Prompts are the starts of evenly spaced held-out windows (one per row, so the rows read
different books). For each batch size and setting, `sparse_quality.union_density` decodes
with ``batch_mode="union"`` and records the MLP and head densities the union used.
Writes ``<out>/union_density.json`` and ``union_density.png``. Densities do not depend on
the device; this runs on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/opt-gutenberg-6l")
    p.add_argument("--text", required=True, help="held-out text: .npy of ids, .txt / .txt.xz, or wiki.*.raw")
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--settings", default='[{}, {"mlp_density": 0.1, "head_keep": 1.0}, '
                                          '{"mlp_density": 0.3, "head_keep": 1.0}, {"mlp_density": 0.1, "head_keep": 0.5}]',
                   help="JSON list of SparsityConfig settings ({}: the predictors' calibrated sets)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    import dejavu_jax as dj
    from dejavu_jax import sparse_quality as SQ
    from dejavu_jax.bench import environment
    from dejavu_jax.errors import InputError
    from dejavu_jax.predictors.tokens import text_windows

    t0 = time.time()
    model = dj.load_opt(args.model, dtype=jnp.float32)
    pred = dj.load_predictors(None, model)
    batches = [int(b) for b in args.batches.split(",")]
    try:
        windows, _ = text_windows(args.text, args.model, max(batches), args.prompt_len, model.config.bos_token_id)
    except InputError as e:
        p.error(str(e))
    records = SQ.union_density(model, pred, windows, batches, json.loads(args.settings), args.max_new_tokens)
    for r in records:
        print(f"B={r['batch']:3d} setting mlp={r['mlp_density']} heads={r['head_keep']}: row MLP density "
              f"{r['mean_row_mlp_density']:.3f} -> union {r['mean_union_mlp_density']:.3f}; heads union "
              f"{r['mean_union_head_density']:.3f}", flush=True)
    out = {"model": args.model, "text": args.text, "prompt_len": args.prompt_len, "records": records,
           **environment(), "seconds": time.time() - t0,
           "note": "densities of the union of the rows' predicted sets (sparse_decode stats, mean over steps); "
                   "device-independent. Speed at these densities: sparse_decode.json (OPT-13B shape)."}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "union_density.json").write_text(json.dumps(out, indent=1))
    plot(records, Path(args.out) / "union_density.png")
    return 0


def plot(records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    keys = list(dict.fromkeys((r["mlp_density"], r["head_keep"]) for r in records))
    for key in keys:
        pts = [r for r in records if (r["mlp_density"], r["head_keep"]) == key]
        label = "calibrated sets" if key == (None, None) else f"MLP {key[0]:.0%} per row, heads {key[1]:.0%}"
        ax.plot([r["batch"] for r in pts], [r["mean_union_mlp_density"] for r in pts], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("batch size (rows from different held-out books)")
    ax.set_ylabel("MLP density of the union (mean over layers, steps)")
    ax.set_title("Union sparsity vs batch (reference model, trained predictors)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from dejavu_jax.figures import save_figure

    save_figure(fig, path, dpi=120, colors=32)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without the package installed
    sys.exit(main())
