#!/usr/bin/env bash
# One-command set-up: a Python 3.12 virtual environment in .venv with the pinned versions
# (constraints.txt), this package installed editable with its test and lm-eval extras, then README's main
# job: `dejavu generate` on the reference OPT committed under models/.
# SKIP_MAIN_JOB=1 stops after the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  PY=$(PYENV_VERSION=3.12.1 pyenv which python 2>/dev/null || command -v python3.12 || true)
fi
if [ -z "$PY" ]; then
  echo "setup: no Python 3.12 found; install one or set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,lm-eval]"
echo "setup: environment ready in .venv ($(.venv/bin/python --version))"
if [ "${SKIP_MAIN_JOB:-0}" != "1" ]; then
  .venv/bin/dejavu generate --max-new-tokens 40 \
    --prompt "It was a dark and stormy night; the rain fell in torrents, and" \
    --prompt "The old man looked at the sea and"
fi
