"""Which models the written-out decoders take, told from their config (torch-free)."""

from __future__ import annotations

from typing import Any

# Architectures whose decoder layer is exactly: RMSNorm, q/k/v projections with rotary
# position embeddings, attention over the cache, o projection, residual, RMSNorm, SiLU-gated MLP.
LLAMA_SHAPED = ("llama", "qwen2")


def llama_shaped(config: Any) -> bool:
    """Whether a model is a plain Llama-shaped decoder (default rotary embeddings, no sliding
    window, no tensor-parallel split). ``config``: a transformers config or config.json's dict."""
    rope = setting(config, "rope_parameters") or setting(config, "rope_scaling")
    return (
        setting(config, "model_type") in LLAMA_SHAPED
        and setting(config, "hidden_act") == "silu"
        and setting(config, "pretraining_tp", 1) == 1
        and not setting(config, "use_sliding_window", False)
        and (rope is None or rope.get("rope_type", "default") == "default")
    )


def compilable(config: Any, dtype: str) -> bool:
    """Whether the compiled decoder (textgen/models/compiled.py) takes a model in ``dtype``:
    Llama-shaped, int8, or int4 whose projections are whole blocks of 64 output rows (the int4
    kernels' packed layout, so that q/k/v and gate/up can be joined into one matmul each)."""
    if not llama_shaped(config) or dtype not in ("int8", "int4"):
        return False
    if dtype == "int8":
        return True
    width, heads = setting(config, "hidden_size"), setting(config, "num_attention_heads")
    head_dim = setting(config, "head_dim") or width // heads
    kv_heads = setting(config, "num_key_value_heads") or heads
    rows = (width, heads * head_dim, kv_heads * head_dim, setting(config, "intermediate_size"))
    return all(count % 64 == 0 for count in rows)


def setting(config: Any, key: str, default: Any = None) -> Any:
    """A value of a transformers config or of config.json's dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)
