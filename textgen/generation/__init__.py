"""Generation: strategy presets, stop strings, prompt assembly and the model runner."""
