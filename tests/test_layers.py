"""The contract modules (request and response schemas) load without the model stack."""

from __future__ import annotations

import json
import subprocess
import sys

CONTRACT_MODULES = [
    "textgen.api.fields",
    "textgen.api.schemas",
    "textgen.openai.protocol",
    "textgen.api.responses",
    "textgen.openai.responses",
    "textgen.engine.results",
    "textgen.config",
    "textgen.errors",
]


def test_contract_modules_import_no_torch() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in CONTRACT_MODULES)
        + "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'numpy')"
        " if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_a_module_that_pulls_torch_is_seen() -> None:
    # The check above would pass vacuously if the probe could not see torch at all.
    code = "import sys, textgen.engine.grammar; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
