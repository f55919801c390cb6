"""On-disk format of collected activations, and a reader.

    <root>/meta.json                   settings of the collection (see collect.py) + fingerprint
    <root>/<split>/shard_00000/        split is "train" or "heldout"
        attn_in.npy     [L, N, d]      store dtype (f16 by default)  layer's residual input
        mlp_in.npy      [L, N, d]      store dtype                   residual before mlp_ln
        mlp_act.npy     [L, N, F]      f16                           fc1 output after ReLU
        mlp_active.npy  [L, N, F/8]    uint8                         np.packbits(fc1 > 0), exact
        head_norm.npy   [L, N, H]      f32                           per-head output L2 norm
        tokens.npy      [N]            int32                         token id at the position
        positions.npy   [N]            int32                         position in its window
        done.json                      {"positions": N, "windows": [first, last + 1]}

A shard is written into a temporary directory and renamed into place, so a directory named
``shard_*`` is always complete; an interrupted collection leaves only ``.tmp`` directories,
removed when it resumes. Shard i of a split always holds the same windows, so a resumed
collection skips finished shards and writes the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dejavu_jax.errors import InputError

LAYER_FIELDS = ("attn_in", "mlp_in", "mlp_act", "mlp_active", "head_norm")
POSITION_FIELDS = ("tokens", "positions")
SPLITS = ("train", "heldout")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def write_shard(split_dir: Path, index: int, arrays: dict[str, np.ndarray], windows: tuple[int, int]) -> Path:
    """Write one shard atomically (temporary directory, then rename). Returns its path."""
    final = split_dir / shard_name(index)
    tmp = split_dir / f".{shard_name(index)}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    n = int(arrays["tokens"].shape[0])
    (tmp / "done.json").write_text(json.dumps({"positions": n, "windows": list(windows)}))
    try:
        os.rename(tmp, final)
    except OSError:  # another writer finished it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def complete_shards(split_dir: Path) -> list[Path]:
    """Finished shard directories of a split, in order."""
    if not split_dir.exists():
        return []
    return sorted(p for p in split_dir.glob("shard_*") if (p / "done.json").exists())


def remove_partial(split_dir: Path) -> None:
    """Delete temporary directories an interrupted run left behind."""
    for p in split_dir.glob(".shard_*.tmp*") if split_dir.exists() else []:
        shutil.rmtree(p, ignore_errors=True)


class ActivationSet:
    """Reads one split of a collection. ``load(field, layers)`` concatenates the shards
    (memory-mapped, only the requested layers are copied)."""

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.exists():
            raise InputError(f"{self.root} holds no collected activations (no meta.json); run "
                             "`dejavu collect` (or dj.collect_activations) first.")
        if split not in SPLITS:
            raise InputError(f"split must be one of {SPLITS}, not {split!r}.")
        self.meta = json.loads(meta_file.read_text())
        self.split = split
        self.shards = complete_shards(self.root / split)
        if not self.shards:
            raise InputError(f"{self.root / split} has no complete shards; the collection did not finish "
                             "any shard of this split. Run `dejavu collect` again (it resumes).")
        self.shard_sizes = [json.loads((s / "done.json").read_text())["positions"] for s in self.shards]

    @property
    def num_positions(self) -> int:
        return sum(self.shard_sizes)

    @property
    def num_layers(self) -> int:
        return int(self.meta["config"]["num_hidden_layers"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def load(self, field: str, layers=None, limit: int | None = None, start: int = 0) -> np.ndarray:
        """Concatenate ``field`` over shards: [len(layers), N, ...] for layer fields (all layers
        when ``layers`` is None), [N] for tokens / positions; positions ``start`` to ``limit``
        (default: all) of the split, in order."""
        if field not in LAYER_FIELDS + POSITION_FIELDS:
            raise InputError(f"unknown field {field!r}; fields are {LAYER_FIELDS + POSITION_FIELDS}.")
        stop = self.num_positions if limit is None else min(limit, self.num_positions)
        parts, offset = [], 0
        for shard, n in zip(self.shards, self.shard_sizes):
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            offset += n
            if hi <= lo:
                continue
            arr = np.load(shard / f"{field}.npy", mmap_mode="r")
            if field in LAYER_FIELDS:
                arr = arr[:, lo:hi] if layers is None else arr[list(layers), lo:hi]
            else:
                arr = arr[lo:hi]
            parts.append(np.ascontiguousarray(arr))
        if not parts:
            raise InputError(f"no positions in [{start}, {stop}) of {self.root / self.split}.")
        return np.concatenate(parts, axis=1 if field in LAYER_FIELDS else 0)
