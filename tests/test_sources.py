"""Model sources: the Hub loader on a cache the test builds, and the failures it explains."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from tests.conftest import tiny_config
from textgen import create_app
from textgen.models.cache import ModelCache
from textgen.models.sources import ModelUnavailable, prepare
from textgen.models.specs import make_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache_root: Path, repo: str, model_dir: Path) -> Path:
    """Lay a model out exactly as huggingface_hub caches a download of ``repo``."""
    repo_dir = cache_root / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the Hub client at a closed loopback port: nothing is reachable."""
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_hub_model_loads_from_the_cache(model_dirs, tmp_path, offline_hub) -> None:
    fake_hub_cache(tmp_path, "textgen-test/tiny", model_dirs["tiny-llama"])
    config = tiny_config(model_dirs, tmp_path, MODELS="textgen-test/tiny")
    app = create_app(config)
    client = app.test_client()
    info = client.get("/models").get_json()["models"][0]
    assert info["name"] == "textgen-test/tiny"
    assert info["kind"] == "hub" and info["revision"] == COMMIT
    response = client.post("/generate", json={"prompt": "Hello", "model": "textgen-test/tiny"})
    assert response.status_code == 200


def test_pinned_revision_is_used(model_dirs, tmp_path, offline_hub) -> None:
    fake_hub_cache(tmp_path, "textgen-test/tiny", model_dirs["tiny-llama"])
    spec = make_spec("textgen-test/tiny", revision=COMMIT)
    assert prepare(spec, ModelCache(tmp_path)).revision == COMMIT
    with pytest.raises(ModelUnavailable, match="revision v9"):
        prepare(make_spec("textgen-test/tiny", revision="v9"), ModelCache(tmp_path))


def test_missing_hub_model_fails_fast_with_a_fix(tmp_path, offline_hub) -> None:
    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        prepare(make_spec("textgen-test/absent"), ModelCache(tmp_path), probe_timeout=2)
    assert time.monotonic() - started < 10  # no retry loop (a bound on hanging, not a speed test)
    message = str(err.value)
    assert "textgen-test/absent" in message
    assert str(tmp_path / "hub") in message
    assert "textgen pull" in message


def test_hub_offline_flag_is_respected(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE"):
        prepare(make_spec("gpt2"), ModelCache(tmp_path))


def test_pickle_only_checkpoints_are_refused(model_dirs, tmp_path, offline_hub) -> None:
    snapshot = fake_hub_cache(tmp_path, "textgen-test/pickled", model_dirs["tiny-gpt2"])
    for weights in snapshot.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelUnavailable, match="safetensors only"):
        prepare(make_spec("textgen-test/pickled"), ModelCache(tmp_path))


def test_remote_code_needs_consent(model_dirs, tmp_path) -> None:
    model = tmp_path / "custom"
    shutil.copytree(model_dirs["tiny-gpt2"], model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailable, match="trust_remote_code"):
        create_app(tiny_config({}, tmp_path, MODELS=str(model)))


def test_local_directory_without_config(tmp_path) -> None:
    with pytest.raises(ModelUnavailable, match="no config.json"):
        prepare(make_spec(str(tmp_path)), ModelCache(tmp_path))


def test_missing_gguf_file(tmp_path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        prepare(make_spec(str(tmp_path / "model.gguf")), ModelCache(tmp_path))


def test_cache_lists_hub_entries(model_dirs, tmp_path) -> None:
    fake_hub_cache(tmp_path, "textgen-test/tiny", model_dirs["tiny-llama"])
    entries = ModelCache(tmp_path).entries()
    assert entries[0]["repo"] == "textgen-test/tiny"
    assert entries[0]["revisions"] == [COMMIT]
    assert entries[0]["bytes"] > 0


def test_is_prepared_checks_without_loading(model_dirs, tmp_path, offline_hub) -> None:
    from textgen.models.sources import is_prepared

    cache = ModelCache(tmp_path)
    assert is_prepared(make_spec(str(model_dirs["tiny-gpt2"])), cache)
    assert not is_prepared(make_spec(str(tmp_path / "none")), cache)
    assert not is_prepared(make_spec("textgen-test/tiny"), cache)
    fake_hub_cache(tmp_path, "textgen-test/tiny", model_dirs["tiny-llama"])
    assert is_prepared(make_spec("textgen-test/tiny"), cache)
    assert not is_prepared(make_spec(str(tmp_path / "x.gguf")), cache)


def test_is_prepared_sees_quantized_weights_of_a_symlinked_directory(model_dirs, tmp_path) -> None:
    """prepare() resolves a local directory, so is_prepared must name its quantized file alike
    (else gunicorn's master would run `textgen pull` on every start)."""
    from textgen.models.loading import load_model
    from textgen.models.sources import is_prepared

    link = tmp_path / "linked-model"
    link.symlink_to(model_dirs["tiny-llama"])
    cache = ModelCache(tmp_path / "cache")
    spec = make_spec(str(link), dtype="int8")
    assert not is_prepared(spec, cache)
    load_model(spec, cache)
    assert is_prepared(spec, cache)


def test_file_digest_is_remembered_until_the_file_changes(tmp_path) -> None:
    import os

    from textgen.models.sources import file_digest

    cache = ModelCache(tmp_path / "cache")
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"one")
    calls: list[Path] = []

    def counting(p: Path) -> str:
        calls.append(p)
        return file_digest(p)

    first = cache.digest(path, counting)
    assert cache.digest(path, counting) == first and len(calls) == 1
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 1))
    assert cache.digest(path, counting) != first and len(calls) == 2
