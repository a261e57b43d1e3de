"""Pure jnp/lax implementations of the jsparse kernels (the CPU path and the reference)."""
