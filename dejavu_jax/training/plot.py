"""Loss-curve plot of a training run (from its history records)."""

from __future__ import annotations

import numpy as np

from dejavu_jax.figures import save_figure


def plot_loss_curve(history: list[dict], path, title: str = "", smooth: int = 50) -> None:
    """Training loss (raw, faint, and a ``smooth``-step moving average) and held-out loss vs
    tokens seen; learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        tok = np.array([r["tokens"] for r in train]) / 1e6
        loss = np.array([r["loss"] for r in train])
        ax.plot(tok, loss, color="tab:blue", alpha=0.25, lw=0.8)
        if len(loss) >= smooth:
            avg = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
            ax.plot(tok[smooth - 1:], avg, color="tab:blue", label=f"train (mean of {smooth} steps)")
        lr_ax = ax.twinx()
        lr_ax.plot(tok, [r["lr"] for r in train], color="gray", ls=":", lw=1)
        lr_ax.set_ylabel("learning rate", color="gray")
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["heldout_loss"] for r in evals], "o-",
                color="tab:orange", label="held-out")
    ax.set(xlabel="tokens seen (millions)", ylabel="loss (nats/token)", title=title or "training")
    if train:
        lo = min(min(r["loss"] for r in train[len(train) // 10:] or train), 
                 min((r["heldout_loss"] for r in evals), default=np.inf))
        ax.set_ylim(max(0.0, lo - 0.3), min(11.0, lo + 4.0))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
