"""Settings: TEXTGEN_* environment variables, validated once at startup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, post_load, validate
from marshmallow import fields as f

from textgen.models.specs import ModelSpec, SpecError, parse_model_specs

PREFIX = "TEXTGEN"


class ConfigError(Exception):
    """A setting is missing, malformed or out of range."""


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one textgen process."""

    models: tuple[ModelSpec, ...]
    model_cache: Path
    bind: str
    load_mode: str
    warmup: bool
    compile: bool
    torch_threads: int
    max_prompts: int
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_sequences: int
    max_stop_strings: int
    max_body_bytes: int
    max_batch: int
    max_queue: int
    max_queue_tokens: int
    prefix_cache_tokens: int
    draft_tokens: int
    prefill_chunk_tokens: int
    max_schema_bytes: int
    grammar_timeout: float
    max_timeout: float
    read_timeout: float
    stream_ping_s: float
    hub_probe_timeout: float
    log_level: str

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values (there are no secrets among them yet)."""
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "models":
                value = [spec.describe() for spec in value]
            elif isinstance(value, Path):
                value = str(value)
            out[field.name] = value
        return out


def default_cache_dir() -> str:
    """Where models are cached when TEXTGEN_MODEL_CACHE is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "textgen")


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class SettingsSchema(Schema):
    """Types, ranges and defaults of every setting (keys are the names without the prefix)."""

    class Meta:
        unknown = RAISE

    MODELS = f.Raw(load_default="smollm2-135m-instruct")
    MODEL_CACHE = f.String(load_default=default_cache_dir, validate=validate.Length(min=1))
    # Read by gunicorn.conf.py; validated and shown here with the rest.
    BIND = f.String(
        load_default="127.0.0.1:8000", validate=validate.Regexp(r"^(\S+:\d+|unix:\S+)$")
    )
    LOAD_MODE = f.String(load_default="background", validate=validate.OneOf(["background", "sync"]))
    WARMUP = f.Boolean(load_default=True)
    # Compile the decoder of int8/int4 Llama-shaped models (once, into the cache): 3-5x faster.
    COMPILE = f.Boolean(load_default=True)
    TORCH_THREADS = f.Integer(load_default=available_cores, validate=validate.Range(min=1, max=256))
    MAX_PROMPTS = f.Integer(load_default=8, validate=validate.Range(min=1, max=256))
    MAX_PROMPT_TOKENS = f.Integer(load_default=4096, validate=validate.Range(min=1))
    MAX_NEW_TOKENS = f.Integer(load_default=1024, validate=validate.Range(min=1))
    DEFAULT_MAX_NEW_TOKENS = f.Integer(load_default=64, validate=validate.Range(min=1))
    MAX_SEQUENCES = f.Integer(load_default=16, validate=validate.Range(min=1, max=256))
    MAX_STOP_STRINGS = f.Integer(load_default=8, validate=validate.Range(min=1, max=64))
    MAX_BODY_BYTES = f.Integer(load_default=1 << 20, validate=validate.Range(min=1024))
    MAX_BATCH = f.Integer(load_default=16, validate=validate.Range(min=1, max=512))
    MAX_QUEUE = f.Integer(load_default=64, validate=validate.Range(min=1))
    MAX_QUEUE_TOKENS = f.Integer(load_default=1 << 18, validate=validate.Range(min=1))
    PREFIX_CACHE_TOKENS = f.Integer(load_default=1024, validate=validate.Range(min=0))
    DRAFT_TOKENS = f.Integer(load_default=3, validate=validate.Range(min=0, max=16))
    PREFILL_CHUNK_TOKENS = f.Integer(load_default=256, validate=validate.Range(min=16))
    MAX_SCHEMA_BYTES = f.Integer(load_default=65536, validate=validate.Range(min=256))
    GRAMMAR_TIMEOUT = f.Float(load_default=10.0, validate=validate.Range(min=0.1, max=600))
    # The whole request (headers and body) must arrive within this, or 408 (slow clients).
    READ_TIMEOUT = f.Float(load_default=30.0, validate=validate.Range(min=0.1, max=600))
    MAX_TIMEOUT = f.Float(load_default=600.0, validate=validate.Range(min=0.1))
    STREAM_PING_S = f.Float(load_default=5.0, validate=validate.Range(min=0.05, max=300))
    HUB_PROBE_TIMEOUT = f.Float(load_default=3.0, validate=validate.Range(min=0.1, max=120))
    LOG_LEVEL = f.String(
        load_default="INFO", validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])
    )

    @post_load
    def make_settings(self, data: dict[str, Any], **_: Any) -> Settings:
        try:
            models = parse_model_specs(data["MODELS"])
        except SpecError as exc:
            raise ValidationError(str(exc), field_name="MODELS") from exc
        if data["DEFAULT_MAX_NEW_TOKENS"] > data["MAX_NEW_TOKENS"]:
            raise ValidationError(
                "must not exceed TEXTGEN_MAX_NEW_TOKENS", field_name="DEFAULT_MAX_NEW_TOKENS"
            )
        values = {key.lower(): value for key, value in data.items()}
        values["models"] = tuple(models)
        values["model_cache"] = Path(data["MODEL_CACHE"]).expanduser().resolve()
        return Settings(**values)


def setting_names() -> list[str]:
    """Every setting's name without the prefix."""
    return sorted(SettingsSchema().fields)


def load_settings(values: Mapping[str, Any]) -> Settings:
    """Validate a mapping of settings (prefix-less keys) and fail with every problem named."""
    known = set(setting_names())
    ours = {key: value for key, value in values.items() if key in known}
    try:
        return SettingsSchema().load(ours)
    except ValidationError as exc:
        problems = "; ".join(
            f"{PREFIX}_{key}: {' '.join(map(str, msgs)) if isinstance(msgs, list) else msgs}"
            for key, msgs in sorted(exc.normalized_messages().items())
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc


def settings_from_env() -> Settings:
    """Settings from TEXTGEN_* variables alone (the CLI and gunicorn's master use this)."""
    from flask import Config

    check_unknown_env(os.environ)
    config = Config(".")
    config.from_prefixed_env(PREFIX)
    return load_settings(config)


def check_unknown_env(environ: Mapping[str, str]) -> None:
    """Reject TEXTGEN_* variables that name no setting (a typo would otherwise be ignored)."""
    known = set(setting_names())
    unknown = sorted(
        key
        for key in environ
        if key.startswith(PREFIX + "_") and key[len(PREFIX) + 1 :] not in known
    )
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)}; known: "
            + ", ".join(f"{PREFIX}_{name}" for name in setting_names())
        )
