"""The compiled decoder's kernel choices (textgen/models/tuning.py): a first timing round that
lies does not choose, a compiled step slower than it should be is reported at compile time and
at every start, and `textgen pull --retune` compiles afresh."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from tests.conftest import served
from textgen.cli import main
from textgen.models import aoti, cpu
from textgen.models.cache import ModelCache, record_path
from textgen.models.tuning import RETUNE, Tuning, warn_if_slow

pytestmark = pytest.mark.slow


def test_each_candidate_is_judged_by_its_fastest_round() -> None:
    tuning = Tuning()
    rounds = [{"aten": 1.0, "cpp": 9.0}, {"aten": 1.1, "cpp": 0.4}, {"aten": 0.9, "cpp": 0.5}]
    assert tuning.timed(rounds, [[1, 2]]) == {"aten": 0.9, "cpp": 0.4}
    (matmul,) = tuning.matmuls
    assert matmul["chosen"] == "cpp" and matmul["first_round_disagreed"] is True
    assert matmul["rounds_ms"]["cpp"] == [9.0, 0.4, 0.5]


def test_a_slow_record_is_reported_with_the_fix(tmp_path: Path, caplog) -> None:
    package = tmp_path / "m-int8.pt2"
    slow = {"compiled_step_ms": 9.0, "eager_step_ms": 10.0, "gain": 1.11, "ok": False}
    record_path(package).write_text(json.dumps({"check": slow}))
    with caplog.at_level(logging.WARNING):
        warn_if_slow(package)
    assert RETUNE in caplog.text and "9.00 ms against 10.00 ms" in caplog.text
    caplog.clear()
    record_path(package).write_text(json.dumps({"check": {**slow, "ok": True}}))
    warn_if_slow(package)
    assert caplog.text == ""


def lying_first_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each matmul's first timing round reports its fastest candidate 1,000 times slower (as a
    burst of load on a shared machine does)."""
    from torch._inductor.select_algorithm import AlgorithmSelectorCache as Selector

    real = Selector.__dict__["benchmark_choices"].__func__
    seen: set[tuple[int, ...]] = set()

    def lying(cls: Any, choices: Any, autotune_args: Any, **kwargs: Any) -> Any:
        timings = real(cls, choices, autotune_args, **kwargs)
        key = tuple(id(choice) for choice in choices)
        if key not in seen:
            seen.add(key)
            fastest = min(timings, key=timings.__getitem__)
            timings[fastest] *= 1000
        return timings

    monkeypatch.setattr(Selector, "benchmark_choices", classmethod(lying))


def slow_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled steps that take 50 ms more (what kernels chosen badly do, exaggerated)."""
    call = aoti.CompiledPackage.__call__

    def slowed(self: Any, *args: Any) -> Any:
        time.sleep(0.05)
        return call(self, *args)

    monkeypatch.setattr(aoti.CompiledPackage, "__call__", slowed)


def test_lying_timings_and_a_slow_step_are_caught_and_retuned(
    model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    source = str(model_dirs["tiny-llama"])
    models = [{"name": "t", "source": source, "dtype": "int8"}]
    # PyTorch's int8 format, whose matmuls Inductor tunes (textgen's kernels, and their
    # attention, are not tuned: there the package has no matmul to choose).
    monkeypatch.setattr(cpu, "blocks_preferred", lambda: False)
    monkeypatch.setenv("TEXTGEN_MODELS", json.dumps(models))
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    cache = ModelCache(tmp_path)

    with monkeypatch.context() as patched, caplog.at_level(logging.WARNING):
        lying_first_round(patched)
        slow_package(patched)
        result = CliRunner().invoke(main, ["pull"])
        assert result.exit_code == 0, result.output
    package = cache.compiled_path(Path(source), "int8")  # keyed by the quantized weights
    record = json.loads(record_path(package).read_text())
    assert record["matmuls"]
    # The lie is in the record, and did not choose: every matmul took its fastest candidate
    # over all rounds.
    for matmul in record["matmuls"]:
        rounds = matmul["rounds_ms"]
        assert matmul["chosen"] == min(rounds, key=lambda name: min(rounds[name]))
        assert any(times[0] > 100 * min(times[1:]) for times in rounds.values())
    assert any(matmul["first_round_disagreed"] for matmul in record["matmuls"])
    # Each shape was timed once, not once per layer.
    shapes = [json.dumps(matmul["shapes"]) for matmul in record["matmuls"]]
    assert len(shapes) == len(set(shapes))
    # The check after compiling caught the slow step, then and at the next start.
    assert record["check"]["ok"] is False and RETUNE in caplog.text
    caplog.clear()
    config = {"MODELS": models, "MODEL_CACHE": str(tmp_path), "LOAD_MODE": "sync"}
    with caplog.at_level(logging.WARNING), served(config):
        pass
    assert RETUNE in caplog.text

    quantized = cache.quantized_path(Path(source), "int8")
    kept = quantized.stat().st_mtime_ns
    result = CliRunner().invoke(main, ["pull", "--retune"])
    assert result.exit_code == 0, result.output
    assert f"deleted {package}" in result.output and str(quantized) not in result.output
    assert quantized.stat().st_mtime_ns == kept  # the weights are not quantized again
    retuned = json.loads(record_path(package).read_text())
    assert retuned["check"]["ok"] is True and retuned["written"] >= record["written"]
    with served(config) as url:
        assert requests.get(f"{url}/models", timeout=30).json()["models"][0]["compiled"]
        body = {"prompt": "Hello", "max_new_tokens": 4, "ignore_eos": True}
        answer = requests.post(f"{url}/generate", json=body, timeout=60).json()
        assert answer["results"][0]["outputs"][0]["completion_tokens"] == 4
