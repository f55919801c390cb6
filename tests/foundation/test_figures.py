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
