"""`python -m textgen` runs the CLI."""

from textgen.cli import main

main()
