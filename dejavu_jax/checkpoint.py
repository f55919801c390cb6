"""Load, save and convert OPT checkpoints.

Two on-disk formats:

* a **Hugging Face OPT directory**: ``config.json`` plus ``model.safetensors``, sharded
  ``model-*.safetensors`` with ``model.safetensors.index.json``, or ``pytorch_model.bin``
  (sharded with ``pytorch_model.bin.index.json``). Read tensor by tensor, one weight file open
  at a time, so peak host memory is about one shard plus the result.
* **our orbax checkpoint**: a directory holding ``params/`` (orbax, the pytree of
  `dejavu_jax.model`), ``config.json`` (Hugging Face format), the tokenizer files, and the
  completion marker ``dejavu_checkpoint.json`` (format version, dtype), written last.

Every save writes into a hidden ``.<name>.dejavu-partial-*`` directory beside the target
and renames it into place at the end, so an interrupted save never leaves a directory that
looks complete.

    model = load_opt("facebook-opt-1.3b/", jnp.bfloat16)   # HF dir or orbax dir
    save(model, "ckpt/opt-1.3b")                              # orbax
    convert("facebook-opt-1.3b/", "ckpt/opt-1.3b")            # the two at once
    save_hf(model, "export/", max_shard_size="2GB")           # back to Hugging Face
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dejavu_jax import weights
from dejavu_jax.config import OPTConfig
from dejavu_jax.errors import CheckpointError, ConfigError
from dejavu_jax.model import OPTModel, param_shapes

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
MARKER_FILE = "dejavu_checkpoint.json"
FORMAT_NAME = "dejavu-jax-orbax"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
PARTIAL_TAG = ".dejavu-partial-"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")

# A leaf's path in the params pytree, e.g. ("layers", 3, "mlp", "fc1") or ("embed_tokens",).
LeafPath = tuple
ShardingSpec = jax.sharding.Sharding | Callable[[LeafPath], jax.sharding.Sharding] | None


# ---- small helpers --------------------------------------------------------------------------
def resolve_dtype(dtype) -> np.dtype:
    """``jnp.bfloat16`` / ``"bfloat16"`` / ``np.float32`` ... -> numpy dtype; only float32,
    bfloat16 and float16 are accepted."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in SUPPORTED_DTYPES:
        raise CheckpointError(
            f"unsupported dtype {dtype!r}; OPT weights load as one of {list(SUPPORTED_DTYPES)} "
            "(e.g. dtype=jnp.bfloat16 or --dtype bfloat16).")
    return dt


def _sharding_fn(sharding: ShardingSpec) -> Callable[[LeafPath], jax.sharding.Sharding]:
    if sharding is None:
        device = jax.devices()[0]
        return lambda path: jax.sharding.SingleDeviceSharding(device)
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda path: sharding
    if callable(sharding):
        return sharding
    raise CheckpointError(
        f"sharding must be a jax.sharding.Sharding, a callable leaf_path -> Sharding, or None; "
        f"got {type(sharding).__name__}.")


def _leaf_path(keys) -> LeafPath:
    """A `tree_flatten_with_path` key path -> the tuple form `weights.params_from_hf` uses."""
    return tuple(k.key if hasattr(k, "key") else k.idx for k in keys)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a complete dejavu orbax checkpoint directory (its marker file exists)."""
    return (Path(path) / MARKER_FILE).is_file()


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy whichever tokenizer files exist in ``src`` into ``dst``; returns their names."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def _atomic_dir(target: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden directory beside ``target``; on success rename it to ``target``
    (replacing an old one when ``overwrite``), on any failure delete it."""
    target = Path(target).absolute()
    if target.exists() and not (overwrite and target.is_dir()):
        raise CheckpointError(
            f"{target} already exists; choose a new directory or pass overwrite=True "
            "(--overwrite) to replace it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}{PARTIAL_TAG}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.dejavu-replaced-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- reading Hugging Face weight files ------------------------------------------------------
class _WeightReader:
    """``reader(canonical_name) -> np.ndarray`` over a HF directory's weight files, keeping one
    file (shard) open at a time. Raises KeyError for a tensor the files do not hold."""

    def __init__(self, kind: str, entries: dict[str, tuple[Path, str]]):
        self.kind, self.entries = kind, entries  # canonical name -> (file, name in the file)
        self._file: Path | None = None
        self._handle: Any = None

    def _open(self, file: Path) -> None:
        if file == self._file:
            return
        self._file, self._handle = None, None  # release the previous shard first
        if self.kind == "safetensors":
            self._handle = _safe_open(file)
        else:
            self._handle = _torch_load(file)
        self._file = file

    def __call__(self, name: str) -> np.ndarray:
        file, stored_name = self.entries[name]
        self._open(file)
        if self.kind == "safetensors":
            return self._handle.get_tensor(stored_name)
        t = self._handle[stored_name]
        import torch
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def close(self) -> None:
        self._file, self._handle = None, None


def _safe_open(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except Exception as e:
        raise CheckpointError(
            f"could not read {file} ({type(e).__name__}: {e}); the file is damaged or truncated "
            "(an interrupted download?): fetch or save it again.") from None


def _torch_load(file: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{file} is a PyTorch pickle; reading it needs torch (pip install torch), or save the "
            "model with safetensors instead (model.save_pretrained(dir)).") from None
    try:
        try:
            return torch.load(file, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (non-zip) files cannot be memory-mapped
            return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses arbitrary pickled objects; damaged files
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"could not read {file} with torch.load(weights_only=True): {why.split(" Please use")[0][:300].rstrip(".")}. Only plain "
            "state dicts of tensors are loaded; re-save the model with "
            "model.save_pretrained(dir).") from None


def _index_entries(index_file: Path) -> dict[str, tuple[Path, str]]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file} is not a valid shard index ({e}); re-save the model.") from None
    missing = sorted({f for f in weight_map.values() if not (index_file.parent / f).is_file()})
    if missing:
        raise CheckpointError(
            f"{index_file.name} lists shard files that are not in {index_file.parent}: {missing}; "
            "copy the missing shards (an interrupted download?).")
    return {weights.canonical_name(n): (index_file.parent / f, n) for n, f in weight_map.items()}


def _open_hf_weights(path: Path) -> _WeightReader:
    """Pick the weight files of a HF directory: safetensors first, then pytorch_model.bin."""
    if (path / "model.safetensors.index.json").is_file():
        return _WeightReader("safetensors", _index_entries(path / "model.safetensors.index.json"))
    if (path / "model.safetensors").is_file():
        file = path / "model.safetensors"
        names = list(_safe_open(file).keys())
        return _WeightReader("safetensors", {weights.canonical_name(n): (file, n) for n in names})
    if (path / "pytorch_model.bin.index.json").is_file():
        return _WeightReader("torch", _index_entries(path / "pytorch_model.bin.index.json"))
    if (path / "pytorch_model.bin").is_file():
        file = path / "pytorch_model.bin"
        reader = _WeightReader("torch", {})
        reader._open(file)
        reader.entries = {weights.canonical_name(n): (file, n) for n in reader._handle}
        return reader
    present = sorted(p.name for p in path.iterdir())
    raise CheckpointError(
        f"no weight files in {path} (found {present}); a Hugging Face OPT directory holds "
        "model.safetensors, model-*.safetensors with model.safetensors.index.json, or "
        "pytorch_model.bin. Save one with OPTForCausalLM.save_pretrained(dir).")


# ---- loading --------------------------------------------------------------------------------
def load_opt(path: str | Path, dtype=jnp.bfloat16, *, sharding: ShardingSpec = None,
             mesh: jax.sharding.Mesh | None = None, progress: bool = True) -> OPTModel:
    """Load an OPT model from a Hugging Face directory or a dejavu orbax checkpoint.

    dtype: float32 / bfloat16 / float16 (``None``: keep the checkpoint's own dtype).
    sharding: None (the default device), one `jax.sharding.Sharding` for every leaf, or a
    callable ``leaf_path -> Sharding`` (leaf_path like ``("layers", 3, "mlp", "fc1")``); each
    leaf is placed there directly as it is read, never gathered on one device first.
    mesh: a mesh with a ``"tp"`` axis (`dejavu_jax.parallel.make_mesh`): each leaf goes
    straight onto its tensor-parallel sharding (`dejavu_jax.parallel.shardings`); orbax
    reads each device's slice only. Give ``sharding`` or ``mesh``, not both.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; pass a Hugging Face OPT directory (config.json + weights) "
            "or a checkpoint written by dejavu_jax.save / `dejavu convert`.")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json.")
    if mesh is not None:
        if sharding is not None:
            raise CheckpointError("pass either sharding= or mesh= to load_opt, not both.")
        from dejavu_jax.parallel.shardings import param_sharding_fn
        sharding = param_sharding_fn(_read_config(path), mesh)
    if is_orbax_checkpoint(path):
        return _load_orbax(path, dtype, sharding)
    if PARTIAL_TAG in path.name or (path / PARAMS_DIR).exists():
        raise CheckpointError(
            f"{path} is an incomplete dejavu checkpoint (no {MARKER_FILE}): the save or conversion "
            "that wrote it was interrupted. Delete it and run `dejavu convert` / save() again.")
    if (path / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(
            f"{path} is a bare orbax params directory; pass its parent, the checkpoint directory "
            f"that holds config.json and {MARKER_FILE}.")
    return _load_hf(path, dtype, sharding, progress)


def _read_config(path: Path) -> OPTConfig:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"no config.json in {path}; a Hugging Face OPT directory holds config.json beside its "
            "weights (OPTForCausalLM.save_pretrained(dir) writes both).")
    return OPTConfig.from_pretrained(path)


def _load_hf(path: Path, dtype, sharding: ShardingSpec, progress: bool) -> OPTModel:
    config = _read_config(path)
    if dtype is None:
        raw = json.loads((path / "config.json").read_text())
        stored = raw.get("dtype") or raw.get("torch_dtype")
        dtype = stored if stored in SUPPORTED_DTYPES else "float32"
    dt = resolve_dtype(dtype)
    place = _sharding_fn(sharding)
    reader = _open_hf_weights(path)
    extra = weights.unexpected_tensors(reader.entries, config)
    if extra:
        warnings.warn(f"{path}: ignoring tensors that config.json does not use: {extra[:8]}"
                      f"{' ...' if len(extra) > 8 else ''}", stacklevel=3)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.num_hidden_layers, desc=f"loading {path.name}", unit="layer",
               disable=not progress)
    try:
        params = weights.params_from_hf(
            reader, config, dt, put=lambda a, leaf: jax.device_put(a, place(leaf)),
            progress=bar.update)
    finally:
        bar.close()
        reader.close()
    return OPTModel(config, params, source=str(path.absolute()))


def _load_orbax(path: Path, dtype, sharding: ShardingSpec) -> OPTModel:
    import orbax.checkpoint as ocp

    marker = json.loads((path / MARKER_FILE).read_text())
    if marker.get("format") != FORMAT_NAME or marker.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}/{MARKER_FILE} describes format {marker.get('format')!r} version "
            f"{marker.get('format_version')!r}; this dejavu-jax reads {FORMAT_NAME!r} up to version "
            f"{FORMAT_VERSION}. Upgrade dejavu-jax or re-convert from the Hugging Face directory.")
    config = _read_config(path)
    dt = resolve_dtype(marker.get("dtype", "float32") if dtype is None else dtype)
    place = _sharding_fn(sharding)
    shapes = param_shapes(config, dt)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place(_leaf_path(k))) for k, s in flat])
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore((path / PARAMS_DIR).absolute(), target)
    except Exception as e:
        raise CheckpointError(
            f"could not restore {path / PARAMS_DIR} as the params of the OPT in its config.json "
            f"({type(e).__name__}: {e}); the checkpoint is damaged or was written for another "
            "config. Re-convert it from the Hugging Face directory.") from None
    return OPTModel(config, params, source=str(path.absolute()))


# ---- saving ---------------------------------------------------------------------------------
def save(model: OPTModel, ckpt_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as an orbax checkpoint directory (params, config.json, tokenizer files
    from ``model.source``, marker), atomically. Returns the directory."""
    import orbax.checkpoint as ocp

    target = Path(ckpt_dir).expanduser().absolute()
    with _atomic_dir(target, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, model.params)
            ckptr.wait_until_finished()
        _write_json(tmp / "config.json", model.config.to_hf_dict())
        tokenizer = copy_tokenizer_files(model.source, tmp)
        _write_json(tmp / MARKER_FILE, {  # last: its presence means the checkpoint is complete
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "dtype": jnp.dtype(model.dtype).name, "num_params": model.config.num_params(),
            "tokenizer_files": tokenizer, "source": model.source,
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return target


def convert(hf_dir: str | Path, out_dir: str | Path, dtype=jnp.bfloat16, *,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Hugging Face OPT directory -> dejavu orbax checkpoint in ``dtype``. Params are staged in
    host memory (the CPU device), so no accelerator memory is needed."""
    model = load_opt(hf_dir, dtype, sharding=host_sharding(), progress=progress)
    return save(model, out_dir, overwrite=overwrite)


def host_sharding() -> jax.sharding.Sharding | None:
    """The CPU device (host memory), or None (the default device) where JAX has no CPU backend."""
    try:
        return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:
        return None


def parse_size(size: int | str) -> int:
    """``5_000_000`` / "5MB" (10**6) / "5MiB" (2**20) / "2GB" ... -> bytes."""
    if isinstance(size, int):
        return size
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = size.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * scale
    raise CheckpointError(f"max_shard_size {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB.")


def save_hf(model: OPTModel, out_dir: str | Path, *, max_shard_size: int | str = "5GB",
            overwrite: bool = False) -> Path:
    """Export a standard Hugging Face directory (config.json, safetensors in the model's dtype,
    sharded with ``model.safetensors.index.json`` above ``max_shard_size``, tokenizer files)
    that ``transformers.OPTForCausalLM.from_pretrained`` loads. Atomic like `save`."""
    from safetensors.numpy import save_file

    limit = parse_size(max_shard_size)
    state = weights.hf_state_dict_from_params(model.params, model.config)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in state.items():
        if shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    target = Path(out_dir).expanduser().absolute()
    with _atomic_dir(target, overwrite) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            _write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(a.nbytes for a in state.values())},
                "weight_map": weight_map})
        config = model.config.to_hf_dict()
        config["dtype"] = jnp.dtype(model.dtype).name
        _write_json(tmp / "config.json", config)
        copy_tokenizer_files(model.source, tmp)
    return target
