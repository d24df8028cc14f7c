"""Pallas kernels (GPU and TPU), each beside its plain-XLA reference. Imports only JAX."""
