"""Run part of a jitted computation on a second GPU stream (XLA:GPU stream annotations).

    sets = on_stream(fn, 1)(pred, x)   # same values as fn(pred, x); on GPU, its kernels run
                                       # on stream 1 and overlap what the main stream runs

`jax.experimental.compute_on(compute_type="gpu_stream:N")` marks a call for stream N; XLA wraps
it in an async call-start / call-done pair and schedules the main stream's work between them.
Every jit *nested* inside the marked function (``jnp.where``, ``jnp.take``, ... are jits) is
marked too and becomes an async call inside the async call, which XLA 0.11's runtime rejects
("No ExecutionStreamId found for %call-start ...; only reachable through embedded calls",
measured on the H100). So `on_stream` first traces ``fn`` to a jaxpr and evaluates it with
every nested jit (and custom_jvp / custom_vjp call, whose derivative rules a decode step does
not need) inlined: one flat computation per marked call. On a CPU the call simply runs inline.
"""

from __future__ import annotations

import jax
from jax.extend.core import ClosedJaxpr, Literal

# call-like primitives whose body is evaluated in place: (primitive name, param holding the body)
_INLINED = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
            "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}


def eval_inlined(closed: ClosedJaxpr, *args):
    """``jax.core.eval_jaxpr`` with nested jits and custom-derivative calls inlined."""
    return _eval(closed.jaxpr, closed.consts, args)


def _eval(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    def write(vs, xs):
        for v, x in zip(vs, xs, strict=True):
            env[v] = x

    write(jaxpr.constvars, consts)
    write(jaxpr.invars, args)
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        body = eqn.params.get(_INLINED.get(eqn.primitive.name, ""), None)
        if body is not None:
            body = body if isinstance(body, ClosedJaxpr) else ClosedJaxpr(body, ())
            outs = _eval(body.jaxpr, body.consts, ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        write(eqn.outvars, outs)
    return [read(v) for v in jaxpr.outvars]


def on_stream(fn, stream: int = 1):
    """``fn`` (arrays in, a pytree of arrays out) as one call on GPU stream ``stream``."""
    from jax.experimental.compute_on import compute_on

    if not isinstance(stream, int) or stream < 1:
        raise ValueError(f"stream must be an int >= 1 (0 is the main stream), got {stream!r}.")

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out_tree = jax.tree.structure(out_shape)
        flat = compute_on(lambda *leaves: eval_inlined(closed, *leaves), compute_type=f"gpu_stream:{stream}",
                          out_memory_spaces=jax.memory.Space.Device)(*jax.tree.leaves(args))
        return jax.tree.unflatten(out_tree, flat)

    return wrapped
