"""dejavu-jax: Deja Vu contextual sparsity for OPT in JAX, Flax and Pallas."""
