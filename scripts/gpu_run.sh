#!/usr/bin/env bash
# Wrapper for commands sent to the GPU machine: the commit is passed in (the copy there has
# no .git), output is unbuffered, and JAX does not grab 75% of memory (torch may run too).
# Usage (from the repo root there): DEJAVU_COMMIT=<sha> bash scripts/gpu_run.sh CMD...
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false DEJAVU_COMMIT="${DEJAVU_COMMIT:-unknown}"
exec "$@"
