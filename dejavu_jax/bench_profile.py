"""Where a decode step's GPU time goes: CUPTI kernel records of the jitted decode loops.

`kernel_profile` runs an already-compiled decode function once under CUPTI (through
``jax.experimental.mosaic.gpu.profiler``) and returns every kernel launch (name, ms).
`per_token` takes two such profiles, of N new tokens and of 1, and gives per decode step the
number of kernels, their summed GPU time, and the time per kernel family. Compared with the
wall-clock ms/token this says how much of a step is kernels and how much is launch overhead
(host time the GPU spends idle between kernels). `async_overlap` reads a compiled HLO's
schedule: which kernels XLA placed between an async call's start and done (for calls on a
second stream, what they can overlap with).
"""

from __future__ import annotations

import re
from collections import defaultdict


def kernel_profile(jitted, *args, **kwargs) -> list[tuple[str, float]] | None:
    """[(kernel name, ms)] of one call of ``jitted`` (a jax.jit-wrapped function; static
    arguments as keywords, as for the call that compiled it)."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(jitted, aggregate=False)(*args, **kwargs)
    return timings


def family(name: str) -> str:
    """A kernel's family: its name without numeric suffixes and template arguments, e.g.
    'loop_add_fusion_3' -> 'loop_add_fusion', 'sparse_mlp_kernel' stays."""
    name = name.split("(")[0].split("<")[0]
    name = re.sub(r"[._]\d+$", "", name)
    name = re.sub(r"(_\d+)+$", "", name)
    return name[:80]


def per_token(prof_n: list[tuple[str, float]], prof_1: list[tuple[str, float]], n: int, top: int = 12) -> dict:
    """Per decode step from profiles of n and of 1 new tokens: kernels, kernel ms, and the
    ``top`` kernel families by time (ms and launches per step)."""
    steps = max(1, n - 1)
    t_n = sum(t for _, t in prof_n)
    t_1 = sum(t for _, t in prof_1)
    fam_n: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    fam_1: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for prof, acc in ((prof_n, fam_n), (prof_1, fam_1)):
        for name, t in prof:
            acc[family(name)][0] += t
            acc[family(name)][1] += 1
    fams = {}
    for f, (t, c) in fam_n.items():
        t1, c1 = fam_1.get(f, (0.0, 0))
        fams[f] = {"ms": (t - t1) / steps, "launches": (c - c1) / steps}
    ranked = sorted(fams.items(), key=lambda kv: -kv[1]["ms"])[:top]
    return {"kernels_per_token": (len(prof_n) - len(prof_1)) / steps,
            "kernel_ms_per_token": (t_n - t_1) / steps,
            "families": {f: {k: round(v, 5) for k, v in d.items()} for f, d in ranked}}


_START = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bcall-start\(")
_DONE = re.compile(r"\bcall-done\(.*?%?([\w.\-]+)\)")
_KERNEL = re.compile(r"\b(fusion|custom-call)\(")


def async_overlap(hlo: str) -> list[dict]:
    """For each ``call-start`` in a compiled (scheduled) HLO text, the instructions and kernels
    (fusions, custom calls) XLA placed before its ``call-done``: what can run beside the call.
    -1 instructions: the done is not in the same computation."""
    lines = hlo.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _START.match(line)
        if not m:
            continue
        name = m.group(1)
        between, kernels = 0, 0
        for later in lines[i + 1:]:
            if later.strip().startswith("}"):
                between = -1  # the done is not in this computation
                break
            d = _DONE.search(later)
            if d and d.group(1) == name:
                break
            between += 1
            kernels += bool(_KERNEL.search(later))
        out.append({"call": name, "instructions_between": between, "kernels_between": kernels})
    return out
