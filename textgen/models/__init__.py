"""Model specs, the on-disk model cache, conversion, quantization and loading."""
