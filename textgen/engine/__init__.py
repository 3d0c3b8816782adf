"""The per-model generation engine: continuous batching over one model owned by one thread."""
