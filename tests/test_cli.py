"""The `textgen` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from textgen.cli import main


def test_pull_prepares_configured_models(model_dirs, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TEXTGEN_MODELS", f"tiny={model_dirs['tiny-llama']}")
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["pull"])
    assert result.exit_code == 0, result.output
    assert f"tiny: ready in {model_dirs['tiny-llama']}" in result.output


def test_pull_quantizes_ahead_so_workers_start_warm(model_dirs, tmp_path, monkeypatch) -> None:
    from textgen.models.cache import ModelCache
    from textgen.models.sources import is_prepared
    from textgen.models.specs import parse_model_specs

    entry = f"tiny={model_dirs['tiny-llama']}#int4"
    monkeypatch.setenv("TEXTGEN_MODELS", entry)
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    spec = parse_model_specs(entry)[0]
    # gunicorn's master asks this (without torch) to decide whether to run `pull` first.
    assert not is_prepared(spec, ModelCache(tmp_path))
    result = CliRunner().invoke(main, ["pull"])
    assert result.exit_code == 0, result.output
    assert "(int4)" in result.output
    assert list((tmp_path / "quantized").glob("*-int4.pt"))
    assert is_prepared(spec, ModelCache(tmp_path))


def test_pull_fails_with_the_reason(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["pull", str(tmp_path / "nothing-here")])
    assert result.exit_code == 1
    assert "no config.json" in result.output


def test_bad_configuration_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MAX_NEW_TOKENS", "-1")
    result = CliRunner().invoke(main, ["cache"])
    assert result.exit_code == 1
    assert "TEXTGEN_MAX_NEW_TOKENS" in result.output


def test_cache_lists_entries_as_json(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc"
    hub.mkdir(parents=True)
    (hub / "config.json").write_text("{}")
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["cache", "--json"])
    assert result.exit_code == 0, result.output
    entries = json.loads(result.output)
    assert entries[0]["repo"] == "org/m" and entries[0]["revisions"] == ["abc"]
    table = CliRunner().invoke(main, ["cache"])
    assert "org/m" in table.output
