"""Settings validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from textgen.config import (
    ConfigError,
    load_settings,
    setting_names,
    settings_from_env,
    settings_table,
)


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.models[0].name == "smollm2-135m-instruct"
    assert settings.load_mode == "background"
    assert settings.torch_threads >= 1


def test_env_values_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("TEXTGEN_MODELS", "gpt2,distilgpt2")
    monkeypatch.setenv("TEXTGEN_MAX_NEW_TOKENS", "300")
    monkeypatch.setenv("TEXTGEN_MODEL_CACHE", str(tmp_path))
    settings = settings_from_env()
    assert [s.name for s in settings.models] == ["gpt2", "distilgpt2"]
    assert settings.max_new_tokens == 300
    assert settings.model_cache == tmp_path


def test_unknown_variable_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTGEN_MAX_TOKEN", "5")
    with pytest.raises(ConfigError, match="TEXTGEN_MAX_TOKEN"):
        settings_from_env()


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"MAX_NEW_TOKENS": 0}, "TEXTGEN_MAX_NEW_TOKENS"),
        ({"LOAD_MODE": "lazy"}, "TEXTGEN_LOAD_MODE"),
        ({"MODELS": "gpt2,gpt2"}, "duplicate"),
        ({"DEFAULT_MAX_NEW_TOKENS": 100, "MAX_NEW_TOKENS": 10}, "TEXTGEN_DEFAULT_MAX_NEW_TOKENS"),
        ({"TORCH_THREADS": "many"}, "TEXTGEN_TORCH_THREADS"),
        ({"PREFIX_CACHE_TOKENS": -1}, "TEXTGEN_PREFIX_CACHE_TOKENS"),
        # Users' tokens need a signing secret, long enough not to be guessed offline.
        ({"AUTH": "jwt"}, "TEXTGEN_JWT_SECRET: must be at least 32 bytes"),
        ({"AUTH": "jwt", "JWT_SECRET": "short-secret"}, "TEXTGEN_JWT_SECRET"),
        ({"RATE_LIMIT_STORAGE": "mysql://db"}, "TEXTGEN_RATE_LIMIT_STORAGE"),
    ],
)
def test_bad_settings_name_the_variable(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings(values)


def test_readme_table_is_the_declaration() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- settings table:")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- end of settings table -->")
    assert readme[start:end] == settings_table()


def test_every_setting_is_documented_with_a_default() -> None:
    table = settings_table()
    for name in setting_names():
        row = next(line for line in table.splitlines() if line.startswith(f"| `TEXTGEN_{name}`"))
        variable, default, meaning = (cell.strip() for cell in row.strip("|").split("|"))
        assert default and meaning, name


def test_defaults_come_from_the_declaration() -> None:
    settings = load_settings({})
    assert settings.max_queue == 64
    assert settings.read_timeout == 30.0
    assert settings.bind == "127.0.0.1:8000"


def test_info_masks_a_database_password() -> None:
    settings = load_settings({"DATABASE_URL": "postgresql://textgen:s3cret@db:5432/textgen"})
    shown = settings.public()["database_url"]
    assert "s3cret" not in shown
    assert shown == "postgresql://textgen:***@db:5432/textgen"
    plain = load_settings({"DATABASE_URL": "sqlite:////srv/textgen.db"})
    assert plain.public()["database_url"] == "sqlite:////srv/textgen.db"


def test_a_short_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"AUTH": "jwt", "JWT_SECRET": "hunter2-hunter2"})
    assert "hunter2" not in str(caught.value)
