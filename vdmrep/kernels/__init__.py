"""Hand-written kernels that XLA does not provide fast enough (optional, CPU only)."""
