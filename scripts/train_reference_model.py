#!/usr/bin/env python3
"""Train, export and evaluate the reference OPT (see dejavu_jax/training/reference.py).

    python scripts/train_reference_model.py --help
"""

import time

T0 = time.perf_counter()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu_jax.training.reference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(t0=T0))
