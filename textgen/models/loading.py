"""Loading a prepared model directory into a model and tokenizer ready for CPU generation."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from textgen.models.cache import MARKER, ModelCache
from textgen.models.compiled import load_program
from textgen.models.memory import release_freed_memory
from textgen.models.quantize import apply_dtype, decode_weight_bytes
from textgen.models.sources import ModelUnavailable, PreparedModel, damaged, prepare
from textgen.models.specs import ModelSpec, resolved_dtype

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model, its tokenizer, and the facts /models reports about them."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    prepared: PreparedModel
    context_length: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    load_seconds: float
    parameters: int
    decode_weight_bytes: int  # weights one decode step reads, in their stored format
    program: Any = None  # the compiled decoder (textgen/models/compiled.py), when there is one

    def info(self) -> dict[str, Any]:
        """Public description of the model."""
        return {
            "name": self.spec.name,
            "source": self.spec.source,
            "kind": self.spec.kind,
            "revision": self.prepared.revision,
            "architecture": type(self.model).__name__,
            "parameters": self.parameters,
            "dtype": self.spec.dtype,
            "decode_weight_bytes": self.decode_weight_bytes,
            "compiled": self.program is not None,
            "context_length": self.context_length,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "vocab_size": len(self.tokenizer),
        }


def load_model(
    spec: ModelSpec,
    cache: ModelCache,
    probe_timeout: float = 3.0,
    compiled: bool = False,
    deterministic: bool = True,
) -> LoadedModel:
    """Prepare (download/convert once) and load one model for inference on the CPU; with
    ``compiled``, also its compiled decoder where the model has one (compiled once, cached;
    ``deterministic``: with batch-invariant attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    prepared = prepare(spec, cache, probe_timeout)
    check_remote_code(spec, prepared.path)
    config = json.loads((prepared.path / "config.json").read_text())
    spec = replace(spec, dtype=resolved_dtype(spec.dtype, config, compiled))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            prepared.path,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=spec.trust_remote_code,
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            prepared.path, trust_remote_code=spec.trust_remote_code, local_files_only=True
        )
    except Exception as exc:  # safetensors' own error too, for a broken header
        if (prepared.path / MARKER).is_file():  # a conversion in the cache: rebuild it
            raise damaged(prepared.path, exc) from exc
        raise ModelUnavailable(
            f"model {spec.name!r}: loading {prepared.path} failed: {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    # Counted before int8 conversion, which gives a tied lm_head its own copy.
    parameters = sum(p.numel() for p in model.parameters())
    apply_dtype(model, spec.dtype, prepared.path, cache)
    program = None
    if compiled:
        program = load_program(model, prepared.path, spec.dtype, cache, deterministic)
    release_freed_memory()
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = configure_padding(tokenizer, eos_ids)
    seconds = time.monotonic() - started
    log.info("loaded model %r from %s in %.1f s", spec.name, prepared.path, seconds)
    return LoadedModel(
        spec,
        model,
        tokenizer,
        prepared,
        context_length(model, tokenizer),
        eos_ids,
        pad_id,
        seconds,
        parameters,
        decode_weight_bytes(model),
        program,
    )


def check_remote_code(spec: ModelSpec, path: Path) -> None:
    """Refuse models that need their own Python code unless the entry allows it."""
    config = json.loads((path / "config.json").read_text())
    if "auto_map" in config and not spec.trust_remote_code:
        raise ModelUnavailable(
            f"model {spec.name!r} needs code from its repository (auto_map in config.json); "
            "if you trust it, list it in TEXTGEN_MODELS as "
            '{"source": ..., "trust_remote_code": true}'
        )


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every token id that ends generation, from the generation config and the tokenizer."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return tuple(ids)


def configure_padding(tokenizer: Any, eos_ids: tuple[int, ...]) -> int:
    """Left padding for decoder-only batches, and a pad token for tokenizers without one."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Reusing EOS is safe: outputs are cut at the first EOS, so padding never reaches a client.
        # Without an EOS, id 0 only ever sits under a zero attention mask or after a stop.
        if eos_ids:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_ids[0])
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return int(tokenizer.pad_token_id)


def context_length(model: Any, tokenizer: Any) -> int | None:
    """The longest sequence (prompt plus output) the model can attend over."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 1_000_000 else None
