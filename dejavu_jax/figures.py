"""Saving the plots written beside the results: small PNGs, so the repository stays small.

    save_figure(fig, "benchmarks/results/x.png", dpi=120)

matplotlib writes 24-bit PNGs; a plot's flat colours and anti-aliased edges fit a 256-colour
palette with no visible change, at about half the bytes (958 KB -> 527 KB over the committed
plots). `compact_png` rewrites an existing PNG that way.
"""

from __future__ import annotations

import io
from pathlib import Path


def compact_png(data: bytes, colors: int = 256) -> bytes:
    """A PNG's bytes -> the same image as a palette PNG of ``colors`` colours, or the input if
    not smaller (bar charts of a few flat colours read the same with 32)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        quantized = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    quantized.save(out, "PNG", optimize=True)
    return out.getvalue() if out.tell() < len(data) else data


def save_figure(fig, path, dpi: int = 120, colors: int = 256) -> Path:
    """``fig.savefig(path, dpi=dpi)`` as a palette PNG of ``colors`` colours (`compact_png`);
    other suffixes as is."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        fig.savefig(path, dpi=dpi)
        return path
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    path.write_bytes(compact_png(buf.getvalue(), colors))
    return path
