"""The `textgen` command: prepare models in the cache ahead of time and list what it holds."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from textgen.config import ConfigError, settings_from_env, settings_table
from textgen.logs import configure_logging
from textgen.models.cache import ModelCache
from textgen.models.sources import ModelUnavailable, forget, is_prepared, prepare
from textgen.models.specs import SpecError, parse_model_specs


@click.group()
def main() -> None:
    """textgen: text generation on CPUs."""


@main.command()
@click.argument("sources", nargs=-1)
@click.option(
    "--force", is_flag=True, help="Rebuild conversions, quantized weights and compiled decoders."
)
@click.option(
    "--retune",
    is_flag=True,
    help="Compile the decoders again, their kernels timed afresh (on a quiet machine).",
)
def pull(sources: tuple[str, ...], force: bool, retune: bool) -> None:
    """Download, convert, quantize and compile models into the cache (default:
    TEXTGEN_MODELS)."""
    try:
        settings = settings_from_env()
        specs = parse_model_specs(list(sources)) if sources else list(settings.models)
    except (ConfigError, SpecError) as exc:
        raise click.ClickException(str(exc)) from exc
    # Each step (converting, quantizing, compiling) says what it does and how long it takes.
    configure_logging(settings.log_level, settings.log_format)
    cache = ModelCache(settings.model_cache)
    for spec in specs:
        if force or retune:
            for path in forget(spec, cache, compiled_only=not force):
                click.echo(f"{spec.name}: deleted {path}")
        try:
            prepared = prepare(spec, cache, settings.hub_probe_timeout)
            if not is_prepared(spec, cache, settings.compile, settings.deterministic):
                # Loading once writes the quantized weights and the compiled decoder into the
                # cache (imports torch).
                from textgen.models.loading import load_model

                load_model(
                    spec,
                    cache,
                    settings.hub_probe_timeout,
                    settings.compile,
                    settings.deterministic,
                )
        except ModelUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{spec.name}: ready in {prepared.path} ({spec.dtype})")


@main.command(name="cache")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cache(as_json: bool) -> None:
    """List the models the cache holds."""
    try:
        settings = settings_from_env()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    entries = ModelCache(settings.model_cache).entries()
    if as_json:
        json.dump(entries, sys.stdout, indent=2)
        click.echo()
        return
    click.echo(f"cache: {settings.model_cache}")
    if not entries:
        click.echo("(empty)")
    for entry in entries:
        size = f"{entry['bytes'] / 1e6:8.1f} MB"
        if entry["kind"] == "converted":
            click.echo(f"{size}  converted  {entry['model']}  from {entry['gguf']}")
        else:
            click.echo(f"{size}  hub        {entry['repo']}  {', '.join(entry['revisions'])}")


@main.command(name="settings")
@click.option("--markdown", is_flag=True, help="Print the README's configuration table.")
def show_settings(markdown: bool) -> None:
    """Every setting with its default and meaning (or the effective values, as JSON)."""
    if markdown:
        click.echo(settings_table(), nl=False)
        return
    try:
        click.echo(json.dumps(settings_from_env().public(), indent=2))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def keys() -> None:
    """API keys (TEXTGEN_AUTH=api_key): create, list, revoke."""


def database_url() -> str:
    """Where keys and users are kept (TEXTGEN_DATABASE_URL)."""
    try:
        return settings_from_env().database_url
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def key_store() -> Any:
    from textgen.auth.keystore import KeyStore

    return KeyStore(database_url())


@keys.command(name="create")
@click.argument("name")
@click.option("--models", help="Comma-separated models the key may use (default: all).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Generated tokens per minute.")
def create_key(name: str, models: str | None, rpm: int | None, tpm: int | None) -> None:
    """Make a key and print it (once: only its hash is kept)."""
    from textgen.auth.keystore import KeyNameError

    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        text = key_store().create(name, allowed, rpm, tpm)
    except KeyNameError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(text)
    click.echo(f"key {name!r} created; it is not shown again", err=True)


@keys.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_keys(as_json: bool) -> None:
    """Every key's name, limits and times (never the keys)."""
    rows = key_store().list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "revoked" if row["revoked"] else f"last used {row['last_used_at'] or 'never'}"
        models = ",".join(row["models"]) if row["models"] else "all models"
        click.echo(f"{row['name']}\t{models}\trpm={row['rpm']}\ttpm={row['tpm']}\t{state}")


@keys.command(name="revoke")
@click.argument("name")
def revoke_key(name: str) -> None:
    """Revoke a key at once (on every worker: each request checks the database)."""
    from textgen.auth.keystore import KeyNameError

    try:
        key_store().revoke(name)
    except KeyNameError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"key {name!r} revoked")


@main.group()
def users() -> None:
    """User accounts (TEXTGEN_AUTH=jwt): create, list, disable."""


def user_store() -> Any:
    from textgen.auth.users import UserStore

    return UserStore(database_url())


@users.command(name="create")
@click.argument("username")
@click.option("--admin", is_flag=True, help="An administrator.")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from stdin (else it is prompted)."
)
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Generated tokens per minute.")
def create_user(
    username: str, admin: bool, password_stdin: bool, rpm: int | None, tpm: int | None
) -> None:
    """Make a user (the first one with --admin); there are no default accounts."""
    from textgen.auth.passwords import WeakPassword
    from textgen.auth.users import UserError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        user_store().create(username, password, admin=admin, rpm=rpm, tpm=tpm)
    except (WeakPassword, UserError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"user {username!r} created{' (admin)' if admin else ''}")


@users.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_users(as_json: bool) -> None:
    """Every user's name, role, limits and times (never a password or its hash)."""
    rows = [
        {
            "username": a.username,
            "admin": a.admin,
            "rpm": a.rpm,
            "tpm": a.tpm,
            "created_at": a.created_at.isoformat(),
            "last_login_at": a.last_login_at.isoformat() if a.last_login_at else None,
            "disabled": a.disabled,
        }
        for a in user_store().list()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        role = "admin" if row["admin"] else "user"
        state = "disabled" if row["disabled"] else f"last login {row['last_login_at'] or 'never'}"
        click.echo(f"{row['username']}\t{role}\trpm={row['rpm']}\ttpm={row['tpm']}\t{state}")


@users.command(name="disable")
@click.argument("username")
def disable_user(username: str) -> None:
    """Stop a user logging in; its access tokens stop working at once."""
    from textgen.auth.users import UserError

    try:
        user_store().disable(username)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"user {username!r} disabled")
