"""Dense decode benchmark (issue 3): dense_decode vs HF torch eager / static cache on random
bf16 weights in real OPT shapes, with achieved bandwidth against the peak measured in the same
run. Thin CLI over `dejavu_jax.bench`; run on the GPU machine:

    PYTHONPATH=. python3 scripts/bench_decode.py --out benchmarks/results
"""
from dejavu_jax.bench import main

if __name__ == "__main__":
    main()
