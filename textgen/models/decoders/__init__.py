"""The decoders the compiled path runs, written out one family to a module (exported and
compiled by textgen/models/compiled.py)."""
