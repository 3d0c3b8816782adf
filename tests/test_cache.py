"""The model cache copied, mounted read-only, or damaged (issue: reliability, items 11-12).

The tiny model sits inside the cache, as a conversion does: such directories are named by
their content, so the cache is keyed by its own layout, not by where it is mounted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from tests.conftest import served
from tests.tiny_models import save_tiny_llama
from textgen import create_app
from textgen.cli import main
from textgen.models.cache import ModelCache
from textgen.models.sources import is_prepared
from textgen.models.specs import parse_model_specs


def models(cache: Path) -> list[dict[str, Any]]:
    return [{"name": "tiny", "source": str(cache / "converted" / "tiny"), "dtype": "int8"}]


def config(cache: Path, **extra: Any) -> dict[str, Any]:
    settings = {"MODELS": models(cache), "MODEL_CACHE": str(cache), "TORCH_THREADS": 1}
    return {"LOAD_MODE": "sync", "COMPILE": False, **settings, **extra}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding a model and its int8 weights."""
    cache = tmp_path_factory.mktemp("prepared")
    save_tiny_llama(cache / "converted" / "tiny")
    create_app(config(cache)).extensions["textgen.registry"].close()
    assert list((cache / "quantized").glob("*.pt"))
    return cache


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def generate(url: str) -> requests.Response:
    return requests.post(f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 3}, timeout=60)


def copied(prepared: Path, tmp_path: Path) -> Path:
    """A copy elsewhere, without the files' times (as a plain cp or a volume copy makes)."""
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy, copy_function=shutil.copyfile)
    return copy


def test_a_copied_cache_is_used_as_it_is(prepared: Path, tmp_path: Path) -> None:
    copy = copied(prepared, tmp_path)
    spec = parse_model_specs(models(copy))[0]
    assert is_prepared(spec, ModelCache(copy))
    before = files(copy)
    with served(config(copy)) as url:
        assert generate(url).status_code == 200
    assert files(copy).keys() - before.keys() <= {"locks/tiny.lock"}  # nothing re-quantized


@contextmanager
def read_only(source: Path, mount: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``mount`` (needs root: skipped without it)."""
    mount.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        yield mount
    finally:
        # Lazily: the app keeps its weights memory-mapped until it is collected.
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_read_only_prepared_cache_serves(prepared: Path, tmp_path: Path) -> None:
    with read_only(copied(prepared, tmp_path), tmp_path / "ro") as cache:
        with pytest.raises(OSError, match="Read-only"):
            (cache / "probe").touch()
        with served(config(cache)) as url:
            assert generate(url).status_code == 200


def test_a_damaged_cache_file_is_named_with_its_fix(prepared: Path, tmp_path: Path) -> None:
    cache = copied(prepared, tmp_path)
    (weights,) = (cache / "quantized").glob("*.pt")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with served(config(cache, LOAD_MODE="background")) as url:
        deadline = time.monotonic() + 60
        while (health := requests.get(f"{url}/health", timeout=10).json())["status"] in (
            "idle",
            "loading",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert health["status"] == "failed"
        assert weights.name in health["detail"] and "textgen pull --force" in health["detail"]
        assert str(tmp_path) not in health["detail"]
        response = generate(url)
        assert response.status_code == 503 and weights.name in response.text
    env = {"TEXTGEN_MODELS": json.dumps(models(cache)), "TEXTGEN_MODEL_CACHE": str(cache)}
    result = CliRunner().invoke(main, ["pull", "--force"], env={**env, "TEXTGEN_COMPILE": "0"})
    assert result.exit_code == 0, result.output
    assert f"deleted {weights}" in result.output
    with served(config(cache)) as url:
        assert generate(url).status_code == 200
