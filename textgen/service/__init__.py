"""The per-worker service: which models this worker serves, their loading state and engines."""
