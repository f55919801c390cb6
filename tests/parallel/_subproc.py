"""Run a module of multi-device tests in a fresh Python with 8 simulated CPU devices.

The main test run (pytest -n 2) shares one JAX backend per worker, created with one CPU
device before any test here runs; XLA's device count cannot change after that. So the
multi-device tests live in ``cases_*.py`` files (not collected by the main run) and
`run_cases` runs each file under its own pytest in a subprocess whose environment sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see `device_env`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEVICES = 8
# Optimization level 0 halves XLA's CPU compile time, which dominates these tests (each
# decode is one compiled program); both sides of every comparison are compiled with it.
FLAG = f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0"


def device_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAG).strip()
    env["JAX_PLATFORMS"] = "cpu"
    for var in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_ADDOPTS"):
        env.pop(var, None)
    return env


def run_cases(name: str, timeout: int = 300) -> None:
    """Run tests/parallel/<name> in a subprocess; fail with its report if any test fails."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", "no:randomly", str(HERE / name)]
    proc = subprocess.run(cmd, cwd=REPO, env=device_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{name} failed in its 8-device subprocess (rc {proc.returncode}):\n"
                             f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
