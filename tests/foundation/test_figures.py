"""save_figure / compact_png: plots saved as 256-colour palette PNGs, the same picture."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dejavu_jax.figures import compact_png, save_figure  # noqa: E402


def _figure():
    fig, ax = plt.subplots(figsize=(4, 3))
    x = np.linspace(0, 6, 200)
    for k in range(4):
        ax.plot(x, np.sin(x + k), label=f"curve {k}")
    ax.bar(range(5), [1, 3, 2, 5, 4], alpha=0.3)
    ax.legend()
    return fig


def test_save_figure_writes_a_smaller_palette_png_of_the_same_picture(tmp_path):
    fig = _figure()
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=100)
    path = save_figure(fig, tmp_path / "plot.png", dpi=100)
    plt.close(fig)
    data = path.read_bytes()
    assert len(data) < len(raw.getvalue())
    with Image.open(path) as small, Image.open(io.BytesIO(raw.getvalue())) as full:
        assert small.mode == "P" and small.size == full.size
        a = np.asarray(small.convert("RGB"), np.float32)
        b = np.asarray(full.convert("RGB"), np.float32)
    assert np.abs(a - b).mean() < 2.0  # per channel, of 255: no visible change


def test_other_suffixes_and_already_small_pngs_are_kept(tmp_path):
    fig = _figure()
    pdf = save_figure(fig, tmp_path / "plot.pdf")
    plt.close(fig)
    assert pdf.read_bytes().startswith(b"%PDF")
    tiny = io.BytesIO()
    Image.new("P", (4, 4)).save(tiny, "PNG")
    assert compact_png(tiny.getvalue()) == tiny.getvalue()


def test_fewer_colours_give_a_smaller_png_of_the_same_bar_chart(tmp_path):
    """colors=32 (the same-run variant charts): smaller than 256, still the same picture."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i in range(6):
        ax.barh(i, [3 + i], left=[i], color=f"C{i}")
        ax.text(4 + 2 * i, i, f"{3 + i:.2f} ms", va="center", fontsize=7)
    full, few = save_figure(fig, tmp_path / "a.png", dpi=100), save_figure(fig, tmp_path / "b.png", dpi=100, colors=32)
    raw = io.BytesIO()
    fig.savefig(raw, format="png", dpi=100)
    plt.close(fig)
    assert few.stat().st_size < full.stat().st_size
    with Image.open(few) as small, Image.open(io.BytesIO(raw.getvalue())) as ref:
        assert small.mode == "P" and len(small.getcolors(256)) <= 32
        a = np.asarray(small.convert("RGB"), np.float32)
        b = np.asarray(ref.convert("RGB"), np.float32)
    assert np.abs(a - b).mean() < 3.0
