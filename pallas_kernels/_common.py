"""Shared helpers: argument checks with clear errors, index validation, device facts.

Everything here runs at trace time on static shapes, or on concrete values at the
Python boundary; nothing here is traced into a kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "mosaic", "triton", "xla", "reference")
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
  if impl not in allowed:
    raise ValueError(f"impl={impl!r} is not one of {allowed}.")


def resolve_impl(impl: str, op: str, batch: int, allowed: tuple[str, ...] = IMPLS) -> str:
  """Check ``impl`` against ``allowed``; "auto" becomes what `pallas_kernels.dispatch` names
  for ``op`` at ``batch`` rows."""
  check_impl(impl, allowed)
  if impl == "auto":
    from pallas_kernels import dispatch
    impl = dispatch.backend_for(op, batch=batch)
  return impl


def check_array(name: str, a, *, ndim: int | None = None, shape=None, dtypes=None,
                hint: str = "") -> None:
  """Raises ValueError/TypeError naming the argument, what was wrong and what to do."""
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise TypeError(f"{name} must be an array, got {type(a).__name__}. {hint}".strip())
  if ndim is not None and a.ndim != ndim:
    raise ValueError(
        f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}. {hint}".strip())
  if shape is not None:
    want = tuple(shape)
    got = tuple(a.shape)
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
      pretty = tuple("*" if w is None else w for w in want)
      raise ValueError(f"{name} must have shape {pretty}, got {got}. {hint}".strip())
  if dtypes is not None:
    allowed = tuple(jnp.dtype(t) for t in dtypes)
    if jnp.dtype(a.dtype) not in allowed:
      raise TypeError(
          f"{name} must have dtype in {[str(t) for t in allowed]}, got {a.dtype}. "
          f"{hint or 'Cast it with .astype(...).'}")


def check_acc(acc, shape, out_dtype=None) -> None:
  """The f32 buffer a kernel adds its sum into (``acc=``): of ``shape``, float32; the result
  is float32, so an out_dtype other than float32 is refused."""
  check_array("acc", acc, shape=shape, dtypes=(jnp.float32,),
              hint="acc is the f32 [batch, d] buffer (or [copies, batch, d] where copies are taken) the sum is "
                   "added to.")
  if out_dtype is not None and jnp.dtype(out_dtype) != jnp.float32:
    raise ValueError(f"with acc the result is float32; out_dtype {jnp.dtype(out_dtype)} does not apply.")


def check_unsummed(bias_name: str, bias, acc, out_dtype) -> None:
  """``unsummed=True`` (f32 partials handed on unsummed, without the bias): no ``bias_name``, no
  acc, out_dtype float32 or None."""
  if bias is not None or acc is not None or (out_dtype is not None and jnp.dtype(out_dtype) != jnp.float32):
    raise ValueError(f"unsummed gives f32 partials without the bias: pass {bias_name}=None, no acc and no other "
                     "out_dtype.")


def add_to_first(acc, out):
  """acc [B, d] + out, or acc [G, B, d] with out added to copy 0 (the copies sum to the result)."""
  return acc + out if acc.ndim == 2 else acc.at[0].add(out)


def check_index_dtype(name: str, idx) -> None:
  check_array(name, idx, ndim=1)
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise TypeError(f"{name} must hold integers (int32), got {idx.dtype}. "
                    f"Use {name}.astype(jnp.int32).")


def is_concrete(x) -> bool:
  """True when `x` has a value now (not a tracer under jit/vmap/grad)."""
  if x is None:
    return True
  return not isinstance(x, jax.core.Tracer)


def validate_indices(idx, n: int, count=None, *, name: str = "idx", what: str = "rows") -> None:
  """Checked mode: raises ValueError if the first `count` entries of `idx` are out of
  range [0, n) or repeat. Needs concrete values; call it outside jit."""
  if not (is_concrete(idx) and is_concrete(count)):
    raise ValueError(
        f"validate_indices needs concrete {name}/count; under jit the contract is: the first "
        f"`count` entries of {name} are unique and in [0, {n}). Call it before jit, or pass "
        "checked=False.")
  values = np.asarray(idx)
  if count is not None:
    c = int(np.asarray(count).reshape(()))
    if c < 0 or c > values.shape[0]:
      raise ValueError(f"count={c} must lie in [0, {values.shape[0]}] (the length of {name}).")
    values = values[:c]
  if values.size == 0:
    return
  bad = (values < 0) | (values >= n)
  if bad.any():
    first = int(np.flatnonzero(bad)[0])
    raise ValueError(
        f"{name}[{first}] = {int(values[first])} is out of range: {what} are numbered 0..{n - 1}. "
        "Fix the selection (e.g. clip or drop it) before calling.")
  uniq, counts = np.unique(values, return_counts=True)
  if (counts > 1).any():
    dup = int(uniq[np.flatnonzero(counts > 1)[0]])
    raise ValueError(
        f"{name} holds {dup} more than once; each selected {what[:-1]} must appear once "
        "(a duplicate would be counted twice). Deduplicate, e.g. with jnp.unique.")


def count_array(count, k: int) -> jax.Array:
  """`count` (None, int or integer scalar array) as an int32 [1] array; kernels clamp it
  to [0, k] themselves, so a traced int32 count costs no extra kernel."""
  if count is None:
    return jnp.full((1,), k, jnp.int32)
  c = jnp.asarray(count)
  if c.ndim not in (0, 1) or c.size != 1:
    raise ValueError(f"count must be a scalar, got shape {tuple(c.shape)}.")
  if not jnp.issubdtype(c.dtype, jnp.integer):
    raise TypeError(f"count must be an integer scalar, got {c.dtype}.")
  return c.reshape((1,)).astype(jnp.int32)


def on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def num_sms(default: int = 132) -> int:
  """Streaming multiprocessors of the default GPU (132 on an H100 SXM)."""
  try:
    dev = jax.devices()[0]
    n = getattr(dev, "core_count", None)
    return int(n) if n else default
  except Exception:  # noqa: BLE001 - no device: planning numbers only
    return default


def prod(shape) -> int:
  return int(math.prod(shape))
