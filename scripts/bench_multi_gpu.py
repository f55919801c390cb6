"""Tensor-parallel dense vs sparse decode (issue 8): OPT-30B and OPT-66B shapes, random bf16
weights, batch 1 and 8, on 2 GPUs and on 1 GPU where the model fits. Thin CLI over
`dejavu_jax.parallel.bench`; on the nvidia-h200-x2 machine:

    PYTHONPATH=. python3 scripts/bench_multi_gpu.py --models opt-30b --out benchmarks/results
    PYTHONPATH=. python3 scripts/bench_multi_gpu.py --models opt-66b --merge --out benchmarks/results
    PYTHONPATH=. python3 scripts/bench_multi_gpu.py --models opt-175b --layers 4 --tp 2 --no-single  # a slice

On a CPU (tiny shapes, 2 simulated devices; checks the whole path):

    python scripts/bench_multi_gpu.py --tiny --out /tmp/multi_gpu
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dejavu_jax.parallel.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
