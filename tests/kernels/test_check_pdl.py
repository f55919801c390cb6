"""scripts/check_pdl.py: its two kernels lower for Hopper with the PDL marks (the check itself
needs the GPU), and its plot is written."""

from __future__ import annotations

import jax
import jax.numpy as jnp

def test_pair_lowers_with_pdl_marks(load_script):
    """The spinning kernel lets its dependents launch; the reader waits between its two reads
    and is marked for a PDL launch; in a jit and in a fori_loop body."""
    cp = load_script("check_pdl")
    n, x = jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, cp.N), jnp.float32)
    for fn in (cp.pair, cp.in_loop):
        text = jax.jit(fn).trace(n, x).lower(lowering_platforms=("cuda",)).as_text()
        for mark in ("griddepcontrol.launch_dependents", "griddepcontrol.wait", "mosaic_gpu.uses_pdl"):
            assert mark in text, mark


def test_plot_writes_a_png(tmp_path, load_script):
    cp = load_script("check_pdl")
    recs = [dict(case="launch", read_before_wait=0.0, read_after_wait=1.0),
            dict(case="Triton boundary, no PDL", us_per_pair=35.6, links=16, loops=8),
            dict(case="Mosaic boundary + MLP, PDL", us_per_pair=32.5, links=16, loops=8)]
    cp.plot(recs, tmp_path / "pdl.png")
    assert (tmp_path / "pdl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
