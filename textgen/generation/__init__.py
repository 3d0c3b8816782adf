"""Generation rules without a model: strategy presets, stop strings, why an output ends, prompts."""
