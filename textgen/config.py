"""Settings: TEXTGEN_* environment variables, validated once at startup."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, validate
from marshmallow import fields as f

from textgen.models.specs import ModelSpec, SpecError, parse_model_specs

PREFIX = "TEXTGEN"


class ConfigError(Exception):
    """A setting is missing, malformed or out of range."""


def default_cache_dir() -> str:
    """Where models are cached when TEXTGEN_MODEL_CACHE is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "textgen")


def default_database_url() -> str:
    """A SQLite file under the data directory ($XDG_DATA_HOME/textgen)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return "sqlite:///" + os.path.join(base, "textgen", "textgen.db")


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class CommaList(f.Field):
    """A comma-separated list (or a JSON list): loads as a tuple of non-empty strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValidationError("must be a comma-separated list")
        return tuple(item.strip() for item in items if item.strip())


class Networks(CommaList):
    """A comma-separated list of IP addresses or networks (``127.0.0.1,10.0.0.0/8``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple:
        items = super()._deserialize(value, attr, data, **kwargs)
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValidationError(f"{item!r} is not an IP address or network") from None
        return items


def setting(
    field: f.Field,
    doc: str,
    shown: str | None = None,
    public: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare a setting: its type, range and default (a marshmallow field), its one-line
    documentation, how the default reads in the README when it is computed, and, for one that
    can hold a secret, what of it /info may show."""
    return dataclasses.field(
        metadata={"field": field, "doc": doc, "shown": shown, "public": public}
    )


def without_password(url: str) -> str:
    """A database URL with its password masked (postgresql://user:***@host/db)."""
    return re.sub(r"^([^:/]+://[^:/@]*):[^@]*@", r"\1:***@", url)


def masked(value: str) -> str | None:
    """A secret as /info shows it: whether it is set."""
    return "***" if value else None


def integer(default: Any, low: int | None = 1, high: int | None = None) -> f.Integer:
    return f.Integer(load_default=default, validate=validate.Range(min=low, max=high))


def number(default: float, low: float, high: float | None = None) -> f.Float:
    return f.Float(load_default=default, validate=validate.Range(min=low, max=high))


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one textgen process: every setting, declared once.

    The README's configuration table is generated from these declarations (``textgen
    settings --markdown``; a test keeps the two equal), and gunicorn.conf.py reads them too.
    """

    models: tuple[ModelSpec, ...] = setting(
        f.Raw(load_default="smollm2-135m-instruct"),
        "models to serve, the first is the default (see Models)",
    )
    model_cache: Path = setting(
        f.String(load_default=default_cache_dir, validate=validate.Length(min=1)),
        "the model cache directory (a Docker volume)",
        "`~/.cache/textgen`",
    )
    bind: str = setting(
        f.String(load_default="127.0.0.1:8000", validate=validate.Regexp(r"^(\S+:\d+|unix:\S+)$")),
        "gunicorn's listen address",
    )
    torch_threads: int = setting(
        integer(available_cores, 1, 256),
        "torch threads per worker (workers x threads may not exceed the cores)",
        "cores / workers",
    )
    auth: str = setting(
        f.String(load_default="none", validate=validate.OneOf(["none", "api_key", "jwt"])),
        "`none` (local use; a warning when bound beyond loopback), `api_key` (every route but "
        "health and docs needs `Authorization: Bearer` and a key from `textgen keys create`) or "
        "`jwt` (users log in at `/token`; keys work too)",
    )
    jwt_secret: str = setting(
        f.String(load_default=""),
        "the key that signs access tokens (HS256), at least 32 bytes; needed with "
        "`TEXTGEN_AUTH=jwt`",
        "(none)",
        public=masked,
    )
    jwt_ttl: int = setting(integer(3600, 60, 30 * 86400), "seconds an access token is valid")
    registration: bool = setting(
        f.Boolean(load_default=False), "anyone may make an account at `POST /register`"
    )
    public_docs: bool = setting(
        f.Boolean(load_default=True),
        "`/docs`, `/redoc` and `/openapi.json` are open without auth",
    )
    rate_limit_rpm: int = setting(
        integer(0, 0),
        "requests per minute of a key or user without its own limit, and of each client "
        "address when auth is off (0: none)",
    )
    rate_limit_tpm: int = setting(
        integer(0, 0),
        "generated tokens per minute, likewise; a request that could exceed what is left is "
        "refused before it runs (0: none)",
    )
    login_rpm: int = setting(integer(10), "`POST /token` attempts per minute and client address")
    rate_limit_storage: str = setting(
        f.String(
            load_default="memory://",
            validate=validate.Regexp(r"^(memory://|redis(\+sentinel|\+cluster)?s?://\S*)$"),
        ),
        "where rate-limit counters live: `memory://` (each worker its own) or a Redis URL "
        "shared by every worker and instance",
        public=without_password,
    )
    database_url: str = setting(
        f.String(load_default=default_database_url, validate=validate.Length(min=1)),
        "where API keys and users are kept: any SQLAlchemy URL",
        "`sqlite:///~/.local/share/textgen/textgen.db`",
        public=without_password,
    )
    cors_origins: tuple[str, ...] = setting(
        CommaList(load_default=()),
        "origins (`https://app.example`) whose pages may call the API from a browser; "
        "empty: no cross-origin access",
        "(none)",
    )
    allowed_hosts: tuple[str, ...] = setting(
        CommaList(load_default=()),
        "Host header values served (`api.example,localhost`); any other is a 400, against DNS "
        "rebinding; empty: any",
        "(any)",
    )
    load_mode: str = setting(
        f.String(load_default="background", validate=validate.OneOf(["background", "sync"])),
        "`background`: serve `/health` (503) while loading; `sync`: load inside `create_app`",
    )
    warmup: bool = setting(
        f.Boolean(load_default=True), "one short generation per model before reporting ready"
    )
    # Compiled int8/int4 decoders of Llama-shaped models are 3-5x faster (bench/RESULTS.md).
    compile: bool = setting(
        f.Boolean(load_default=True),
        "compile the decoder of int8 and int4 Llama-shaped models (once, into the cache; "
        "needs a C++ compiler)",
    )
    deterministic: bool = setting(
        f.Boolean(load_default=True),
        "the compiled decoder's attention is batch-invariant: a request gives the same text "
        "alone, in a batch or after a prefix-cache hit (false: PyTorch's fused attention, "
        "faster; see Reproducible outputs)",
    )
    activation_bits: int = setting(
        f.Integer(load_default=16, validate=validate.OneOf([16, 8])),
        "precision of the activations in textgen's int8/int4 kernels: 16 (two int8 digits; "
        "the embedded model's perplexity is float32's) or 8 (one digit, as llama.cpp's: "
        "1.3-1.6x the tokens/s at 16 clients, +0.24% perplexity; see Weight formats)",
    )
    # lm-evaluation-harness sends --batch_size prompts in one request (16 is common).
    max_prompts: int = setting(integer(64, 1, 256), "prompts per request")
    max_prompt_tokens: int = setting(integer(4096), "tokens per prompt")
    max_new_tokens: int = setting(integer(1024), "cap on `max_new_tokens`")
    default_max_new_tokens: int = setting(integer(64), "when a request gives none")
    max_sequences: int = setting(integer(16, 1, 256), "cap on `num_beams x num_return_sequences`")
    max_stop_strings: int = setting(integer(8, 1, 64), "stop strings per request")
    content_special_tokens: str = setting(
        f.String(load_default="escape", validate=validate.OneOf(["escape", "refuse"])),
        "a chat message whose content spells a special token (an end-of-turn token...): `escape` "
        "tokenizes it as plain text, `refuse` answers 400",
    )
    max_body_bytes: int = setting(integer(1 << 20, 1024), "request body size (then 413)")
    max_batch: int = setting(integer(16, 1, 512), "sequences decoded together per model")
    max_queue: int = setting(integer(64), "unfinished requests per model and worker (then 429)")
    max_queue_tokens: int = setting(
        integer(1 << 18), "tokens those requests may still generate (then 429)"
    )
    prefix_cache_tokens: int = setting(
        integer(1024, 0),
        "prompt tokens per model and worker whose keys and values are kept, so a prompt that "
        "starts like a recent one computes only the rest (0: off)",
    )
    draft_tokens: int = setting(
        integer(3, 0, 16),
        "tokens a lone greedy request guesses from its own text and checks in one step of the "
        "compiled decoder (0: off; see Drafts)",
    )
    prefill_chunk_tokens: int = setting(
        integer(256, 16),
        "prompt tokens computed per engine step while nothing else runs; while requests "
        "decode, a chunk takes about 50 ms (at least 4 tokens) between their steps",
    )
    max_schema_bytes: int = setting(
        integer(65536, 256),
        "size of a `response_format` JSON schema (then 400 `schema_too_large`)",
    )
    grammar_timeout: float = setting(
        number(10.0, 0.1, 600),
        "seconds a JSON schema may take to compile (then 400 `schema_too_complex`)",
    )
    # Slow clients: the whole request must arrive within this (textgen/server/worker.py).
    read_timeout: float = setting(
        number(30.0, 0.1, 600),
        "seconds a client has to send its whole request, headers and body (then 408)",
    )
    max_timeout: float = setting(
        number(600.0, 0.1), "cap and default for a request's `timeout` (seconds)"
    )
    stream_ping_s: float = setting(
        number(5.0, 0.05, 300), "seconds of silence before a stream sends `: ping`"
    )
    hub_probe_timeout: float = setting(
        number(3.0, 0.1, 120), "seconds to decide the Hugging Face Hub is unreachable"
    )
    log_format: str = setting(
        f.String(load_default="json", validate=validate.OneOf(["json", "text"])),
        "`json`: one JSON object per log line (a request's line has its id, route, model, "
        "status, tokens, time to first token, duration, client); `text`: plain lines",
    )
    log_prompts: bool = setting(
        f.Boolean(load_default=False), "put each request's prompt or messages in its log line"
    )
    trusted_proxies: tuple[str, ...] = setting(
        Networks(load_default=()),
        "addresses or networks of the proxy in front (nginx on this host: `127.0.0.1`): from "
        "them, `X-Forwarded-For`/`-Proto`/`-Host` are believed (one hop), so logs and "
        "per-address limits see the real client; from anyone else, never",
        "(none)",
    )
    log_level: str = setting(
        f.String(
            load_default="INFO", validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR"])
        ),
        "`DEBUG`, `INFO`, `WARNING` or `ERROR`",
    )

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values, secrets masked by their declarations."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata["public"] is not None:
                value = field.metadata["public"](value)
            elif field.name == "models":
                value = [spec.describe() for spec in value]
            elif isinstance(value, Path):
                value = str(value)
            out[field.name] = value
        return out


def settings_schema() -> Schema:
    """A schema of every declared setting (keys are the names without the prefix)."""
    declared = {
        field.name.upper(): field.metadata["field"] for field in dataclasses.fields(Settings)
    }
    return Schema.from_dict(declared, name="SettingsSchema")(unknown=RAISE)


def make_settings(data: dict[str, Any]) -> Settings:
    """Settings from loaded values, with the checks that span settings."""
    try:
        models = parse_model_specs(data["MODELS"])
    except SpecError as exc:
        raise ValidationError(str(exc), field_name="MODELS") from exc
    if data["DEFAULT_MAX_NEW_TOKENS"] > data["MAX_NEW_TOKENS"]:
        raise ValidationError(
            "must not exceed TEXTGEN_MAX_NEW_TOKENS", field_name="DEFAULT_MAX_NEW_TOKENS"
        )
    if data["AUTH"] == "jwt" and len(data["JWT_SECRET"].encode()) < 32:
        raise ValidationError(
            "must be at least 32 bytes with TEXTGEN_AUTH=jwt (make one with: python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')",
            field_name="JWT_SECRET",
        )
    values = {key.lower(): value for key, value in data.items()}
    values["models"] = tuple(models)
    values["model_cache"] = Path(data["MODEL_CACHE"]).expanduser().resolve()
    return Settings(**values)


def settings_table() -> str:
    """The README's configuration table, from the declarations."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(Settings):
        meta = field.metadata
        assert "|" not in meta["doc"], f"{field.name}: a | would split the table's cells"
        rows.append(
            f"| `{PREFIX}_{field.name.upper()}` | {meta['shown'] or shown_default(meta['field'])}"
            f" | {meta['doc']} |"
        )
    return "\n".join(rows) + "\n"


def shown_default(field: f.Field) -> str:
    value = field.load_default
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) if isinstance(value, int) else f"`{value}`"


def setting_names() -> list[str]:
    """Every setting's name without the prefix."""
    return sorted(field.name.upper() for field in dataclasses.fields(Settings))


def load_settings(values: Mapping[str, Any]) -> Settings:
    """Validate a mapping of settings (prefix-less keys) and fail with every problem named."""
    known = set(setting_names())
    ours = {key: value for key, value in values.items() if key in known}
    try:
        return make_settings(settings_schema().load(ours))
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
