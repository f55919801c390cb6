"""Sparse vs dense decode speed (issue 7) on random bf16 weights in real OPT shapes, with
random predictors of the right shapes, and HF torch eager as the peer. Thin CLI over
`dejavu_jax.bench_sparse`; run on the GPU machine:

    PYTHONPATH=. python3 scripts/bench_sparse_decode.py --models opt-13b,opt-30b --out benchmarks/results
"""
from dejavu_jax.bench_sparse import main

if __name__ == "__main__":
    main()
