"""The `textgen` command: prepare models in the cache ahead of time and list what it holds."""

from __future__ import annotations

import json
import sys

import click

from textgen.config import ConfigError, settings_from_env, settings_table
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
def pull(sources: tuple[str, ...], force: bool) -> None:
    """Download, convert, quantize and compile models into the cache (default:
    TEXTGEN_MODELS)."""
    try:
        settings = settings_from_env()
        specs = parse_model_specs(list(sources)) if sources else list(settings.models)
    except (ConfigError, SpecError) as exc:
        raise click.ClickException(str(exc)) from exc
    cache = ModelCache(settings.model_cache)
    for spec in specs:
        if force:
            for path in forget(spec, cache):
                click.echo(f"{spec.name}: deleted {path}")
        try:
            prepared = prepare(spec, cache, settings.hub_probe_timeout)
            if not is_prepared(spec, cache, settings.compile):
                # Loading once writes the quantized weights and the compiled decoder into the
                # cache (imports torch).
                from textgen.models.loading import load_model

                load_model(spec, cache, settings.hub_probe_timeout, settings.compile)
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
