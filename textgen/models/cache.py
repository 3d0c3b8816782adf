"""The model cache directory: Hub downloads, GGUF conversions, quantized weights, compiled
decoders, and locks."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from textgen.models import cpu

MARKER = "textgen-source.json"
# Weight formats prepared into quantized/ (the others are the model directory's own tensors).
QUANTIZED = ("int8", "int4")
# The computation of textgen/models/compiled.py's Program: bump when it changes, so packages
# compiled from an older one are not loaded. 4: batch-invariant attention (decoders/base.py);
# 5: its weights' matmul padded too (a decode step's 3 rows took another kernel on AVX-512).
# 6: textgen's attention kernel over a float16 KV cache (Program.cache_dtype).
COMPILED_FORMAT = 6
# GPT-2's quantized weights: 2 since its Conv1D layers are quantized too (layers.linearize);
# before, only its output layer was.
CONV1D_FORMAT = 2
# What writing into a cache mounted read-only (or owned by another user) fails with.
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class ModelCache:
    """Layout of TEXTGEN_MODEL_CACHE (the directory Docker mounts as a volume)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hub_dir = root / "hub"
        self.converted_dir = root / "converted"

    def digest(self, path: Path, compute: Callable[[Path], str]) -> str:
        """A file's digest, remembered by path, size and mtime so a restart does not re-hash it."""
        stat = path.stat()
        index_path = self.root / "digests.json"
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns]
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        entry = index.get(key)
        if entry and entry["stamp"] == stamp:
            return str(entry["sha256"])
        digest = compute(path)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self.lock("digests"):
                index = json.loads(index_path.read_text()) if index_path.is_file() else {}
                index[key] = {"stamp": stamp, "sha256": digest}
                staging = index_path.with_suffix(f".{os.getpid()}.tmp")
                staging.write_text(json.dumps(index, indent=2))
                os.replace(staging, index_path)
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            # A read-only cache: hashed again at the next start.
        return digest

    def converted_path(self, key: str) -> Path:
        """Directory that holds (or will hold) one converted model."""
        return self.converted_dir / key

    def quantized_path(self, model_dir: Path, dtype: str) -> Path:
        """The file of a model directory's weights in a quantized format (torch-free to compute).

        Keyed by the directory's weights files and, for a directory outside the cache, its
        absolute path and the files' times. A directory inside the cache (a conversion or a
        Hub snapshot) is already named by its content: it is keyed by its place in the cache
        and its files' names and sizes, so a copied or re-mounted cache stays valid. Also keyed
        by the layout: textgen's kernels' (cpu.BLOCKS_FORMAT), or PyTorch's (int4's by the
        torch version).
        """
        files = sorted(model_dir.glob("*.safetensors"))
        try:
            place = str(model_dir.resolve().relative_to(self.root.resolve()))
            stamp: list[Any] = [(p.name, p.stat().st_size) for p in files]
        except ValueError:  # outside the cache
            place = str(model_dir.resolve())
            stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        layout = ""
        if cpu.blocks_preferred():  # textgen's kernels' layouts (blockwise.py)
            layout = cpu.BLOCKS_FORMAT
        elif dtype == "int4":  # PyTorch's int4 kernel's
            layout = metadata.version("torch")
        parts: list[Any] = [place, stamp, layout]
        if model_type(model_dir) == "gpt2":  # Conv1D layers quantized too since format 2
            parts.append(CONV1D_FORMAT)
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        return self.root / "quantized" / f"{model_dir.name}-{key}-{dtype}.pt"

    def compiled_path(self, model_dir: Path, dtype: str, deterministic: bool = True) -> Path:
        """The compiled decoder of a model directory's int8 or int4 weights (textgen/models/
        compiled.py): keyed by those weights' cache file (its name and size), the torch
        version, the CPU's vector instruction sets (the code is built for them) and
        COMPILED_FORMAT; one with PyTorch's fused attention (not ``deterministic``) is named
        ``...-fused.pt2``."""
        weights = self.quantized_path(model_dir, dtype)
        size = weights.stat().st_size if weights.is_file() else 0
        parts = [weights.name, size, metadata.version("torch"), cpu.cpu_flags(), COMPILED_FORMAT]
        key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
        kind = "" if deterministic else "-fused"
        return self.root / "compiled" / f"{model_dir.name}-{key}-{dtype}{kind}.pt2"

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock so concurrent workers convert or download a model only once."""
        lock_dir = self.root / "locks"
        safe = re.sub(r"[^\w.-]", "_", key)
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            handle = open(lock_dir / f"{safe}.lock", "w")  # noqa: SIM115 - closed below
        except OSError as exc:
            if exc.errno not in READ_ONLY:
                raise
            # A read-only cache (shared by instances): nobody can write, so nothing to guard.
            # What is missing from it fails where it would be written, naming the file.
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def entries(self) -> list[dict[str, Any]]:
        """What the cache holds: converted models and Hub repositories, with sizes."""
        out: list[dict[str, Any]] = []
        if self.converted_dir.is_dir():
            for path in sorted(self.converted_dir.iterdir()):
                marker = path / MARKER
                if marker.is_file():
                    info = json.loads(marker.read_text())
                    out.append(
                        {"kind": "converted", "path": str(path), "bytes": dir_size(path), **info}
                    )
        if self.hub_dir.is_dir():
            for path in sorted(self.hub_dir.glob("models--*")):
                snapshots = sorted(p.name for p in (path / "snapshots").glob("*"))
                repo = path.name.removeprefix("models--").replace("--", "/")
                out.append(
                    {
                        "kind": "hub",
                        "repo": repo,
                        "revisions": snapshots,
                        "path": str(path),
                        "bytes": dir_size(path),
                    }
                )
        return out


def record_path(package: Path) -> Path:
    """Where a compiled package's tuning record lives (textgen/models/tuning.py): beside it."""
    return package.with_name(package.stem + ".tuning.json")


def model_type(model_dir: Path) -> str | None:
    """config.json's model_type, or None where there is no readable config."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def dir_size(path: Path) -> int:
    """Bytes of the files under ``path`` (symlinks followed once, as the Hub cache uses them)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
