"""Which models the written-out decoders take, told from their config (torch-free)."""

from __future__ import annotations

from typing import Any

# Architectures whose decoder layer is exactly: RMSNorm, q/k/v projections with rotary
# position embeddings, attention over the cache, o projection, residual, RMSNorm, SiLU-gated MLP.
LLAMA_SHAPED = ("llama", "qwen2")


def llama_shaped(config: Any) -> bool:
    """Whether a model is a plain Llama-shaped decoder (default rotary embeddings, no sliding
    window, no tensor-parallel split). ``config``: a transformers config or config.json's dict."""

    def get(key: str, default: Any = None) -> Any:
        if isinstance(config, dict):
            return config.get(key, default)
        return getattr(config, key, default)

    rope = get("rope_parameters") or get("rope_scaling")
    return (
        get("model_type") in LLAMA_SHAPED
        and get("hidden_act") == "silu"
        and get("pretraining_tp", 1) == 1
        and not get("use_sliding_window", False)
        and (rope is None or rope.get("rope_type", "default") == "default")
    )
