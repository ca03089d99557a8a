"""The DiT model library: pure JAX/Flax, no file I/O (weight conversion aside, in `dit.convert`)."""
