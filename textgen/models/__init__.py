"""Model specs, the on-disk model cache, loading, and the per-worker registry."""
