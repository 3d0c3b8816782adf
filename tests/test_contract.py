"""schemathesis against the running app and the document it serves: every operation, bounded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import served, tiny_config

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Fixed, so CI time stays predictable: this many valid and as many invalid requests per
# operation, the same ones each run.
EXAMPLES = 40


@pytest.fixture(scope="module")
def contract_url(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    # Low caps keep the generations schemathesis gets through short on the tiny models.
    config = tiny_config(
        model_dirs,
        tmp_path_factory.mktemp("contract-cache"),
        MAX_NEW_TOKENS=8,
        DEFAULT_MAX_NEW_TOKENS=4,
        MAX_SEQUENCES=4,
        MAX_PROMPT_TOKENS=256,
        MAX_TIMEOUT=30,
    )
    with served(config) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(contract_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{contract_url}/openapi.json")


def exercise(operation: Any, mode: GenerationMode, ran: Counter[str]) -> None:
    """EXAMPLES requests of one kind (valid or invalid) to one operation, every check."""
    label = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        ran[label] += 1
        case.call_and_validate(checks=CHECKS, timeout=60)

    check()


def test_every_operation_keeps_its_contract(api_schema: Any) -> None:
    failures: dict[str, str] = {}
    ran: Counter[str] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                exercise(operation, mode, ran)
            except Unsatisfiable:
                # No request to it can be invalid (no body; a path string takes any value).
                if mode is not GenerationMode.NEGATIVE:
                    raise
            except Exception as exc:  # every operation runs; all failures are reported together
                where = f"{operation.method.upper()} {operation.path} ({mode.value})"
                failures[where] = f"{type(exc).__name__}: {exc}"[:3000]
    print(f"schemathesis: {len(operations)} operations, {sum(ran.values())} requests: {dict(ran)}")
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    assert len(operations) >= 11 and len(ran) == len(operations)
