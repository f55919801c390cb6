"""Save and load Predictors (orbax), tied to the model they were trained for.

    <dir>/arrays/            orbax: the six stacked weight arrays
    <dir>/predictors.json    fingerprint, the model's config, mlp_k, head_k, lookahead,
                             block_size, ranks, shapes, and an optional training summary

The default location is ``<model dir>/predictors``. `load_predictors` refuses predictors
whose model config (fingerprint) or shapes do not match the model it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp

from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import CheckpointError
from dejavu_jax.model import OPTModel
from dejavu_jax.predictors.modules import Predictors, config_fingerprint

META_FILE = "predictors.json"
ARRAYS_DIR = "arrays"
FORMAT_VERSION = 1


def default_path(model: OPTModel) -> Path:
    """``<model.source>/predictors``; needs a model loaded from a directory."""
    if not model.source:
        raise CheckpointError("this model was not loaded from a directory; pass an explicit predictor path.")
    return Path(model.source) / "predictors"


def save_predictors(pred: Predictors, path: str | Path, config: OPTConfig, *, summary: dict | None = None,
                    overwrite: bool = True) -> Path:
    """Write ``pred`` (trained for ``config``) to directory ``path``, atomically (a temporary
    directory renamed into place). ``summary``: JSON-able facts to keep beside (metrics)."""
    import orbax.checkpoint as ocp

    pred.check(config)
    if pred.fingerprint != config_fingerprint(config):
        raise CheckpointError("these predictors carry another model's fingerprint than the config given.")
    target = Path(path).expanduser().absolute()
    if target.exists() and not overwrite:
        raise CheckpointError(f"{target} exists; pass overwrite=True to replace it.")
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / ARRAYS_DIR, pred.arrays())
            ckptr.wait_until_finished()
        meta = {"format_version": FORMAT_VERSION, "fingerprint": pred.fingerprint, "config": config.to_hf_dict(),
                "num_layers": pred.num_layers, "rank": pred.rank, "head_rank": pred.head_rank,
                "mlp_k": list(pred.mlp_k), "head_k": list(pred.head_k), "lookahead": pred.lookahead,
                "block_size": pred.block_size,
                "shapes": {k: list(a.shape) for k, a in pred.arrays().items()},
                "dtypes": {k: str(a.dtype) for k, a in pred.arrays().items()},
                "summary": summary or {}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=float))
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _config_differences(saved: dict, config: OPTConfig) -> str:
    now = config.to_hf_dict()
    diffs = [f"{k}: predictors {saved.get(k)!r}, model {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    return "; ".join(diffs) or "(no field differs; the fingerprint format may have changed)"


def load_predictors(path: str | Path | None, model: OPTModel, dtype=None) -> Predictors:
    """Load predictors for ``model`` from ``path`` (a predictor directory, or a model directory
    holding ``predictors/``; None: `default_path(model)`). ``dtype``: cast the weights (e.g.
    jnp.bfloat16). Raises CheckpointError when they were trained for another config."""
    import orbax.checkpoint as ocp

    path = default_path(model) if path is None else Path(path).expanduser().absolute()
    if not (path / META_FILE).exists() and (path / "predictors" / META_FILE).exists():
        path = path / "predictors"
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise CheckpointError(f"no predictors at {path} (no {META_FILE}); train them with "
                              "`dejavu train-predictors` or dj.train_predictors, then save.")
    meta = json.loads(meta_file.read_text())
    want = config_fingerprint(model.config)
    if meta["fingerprint"] != want:
        raise CheckpointError(
            f"the predictors in {path} were trained for another model config (fingerprint {meta['fingerprint']}, "
            f"this model {want}): {_config_differences(meta['config'], model.config)}. Train predictors "
            "for this model (dejavu train-predictors) or load the model they belong to.")
    if meta["num_layers"] != model.config.num_hidden_layers:
        raise CheckpointError(f"the predictors in {path} cover {meta['num_layers']} layers; the model has "
                              f"{model.config.num_hidden_layers}.")
    # A target on this process's default device: predictors saved on a GPU load on a CPU (and
    # back); orbax refuses a restore without one when the saved topology differs.
    place = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {k: jax.ShapeDtypeStruct(tuple(meta["shapes"][k]), jnp.dtype(meta["dtypes"][k]), sharding=place)
              for k in meta["shapes"]}
    try:
        with ocp.StandardCheckpointer() as ckptr:
            arrays = ckptr.restore(path / ARRAYS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"could not restore the predictor arrays in {path / ARRAYS_DIR}: {e}") from e
    for name, shape in meta["shapes"].items():
        if tuple(arrays[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {arrays[name].shape}, its metadata says {shape}; "
                                  "the directory is damaged. Save the predictors again.")
    pred = Predictors(**{k: jnp.asarray(arrays[k]) for k in Predictors.ARRAYS}, mlp_k=tuple(meta["mlp_k"]),
                      head_k=tuple(meta["head_k"]), lookahead=bool(meta["lookahead"]),
                      fingerprint=meta["fingerprint"], block_size=int(meta["block_size"]))
    pred.check(model.config)
    return pred if dtype is None else pred.astype(dtype)


def read_summary(path: str | Path) -> dict:
    """The metadata (including the training summary) of saved predictors, without loading them."""
    return json.loads((Path(path) / META_FILE).read_text())
