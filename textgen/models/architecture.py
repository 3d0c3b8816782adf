"""Which models the written-out decoders take, told from their config (torch-free)."""

from __future__ import annotations

from typing import Any

# Architectures whose decoder layer is exactly: RMSNorm, q/k/v projections with rotary
# position embeddings, attention over the cache, o projection, residual, RMSNorm, SiLU-gated MLP.
LLAMA_SHAPED = ("llama", "qwen2")
# The tanh approximation of GELU, under the names transformers gives it (GPT-2's "gelu_new").
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def llama_shaped(config: Any) -> bool:
    """Whether a model is a plain Llama-shaped decoder (default rotary embeddings, no sliding
    window, no tensor-parallel split). ``config``: a transformers config or config.json's dict."""
    return (
        setting(config, "model_type") in LLAMA_SHAPED
        and setting(config, "hidden_act") == "silu"
        and setting(config, "pretraining_tp", 1) == 1
        and not setting(config, "use_sliding_window", False)
        and default_rotary(config)
    )


def gpt2_shaped(config: Any) -> bool:
    """GPT-2 (gpt2, distilgpt2): learned positions, LayerNorm, a fused q/k/v projection, GELU,
    attention scaled by 1/sqrt(head_dim) and nothing else (no cross-attention, no per-layer
    scaling)."""
    return (
        setting(config, "model_type") == "gpt2"
        and setting(config, "activation_function", "gelu_new") in GELU_TANH
        and setting(config, "scale_attn_weights", True)
        and not setting(config, "scale_attn_by_inverse_layer_idx", False)
        and not setting(config, "reorder_and_upcast_attn", False)
        and not setting(config, "add_cross_attention", False)
    )


def phi_shaped(config: Any) -> bool:
    """Phi (phi-1.5, phi-2): one LayerNorm feeding attention and MLP side by side, rotary
    embeddings on part of each head, GELU, biases everywhere, no q/k LayerNorms."""
    return (
        setting(config, "model_type") == "phi"
        and setting(config, "hidden_act", "gelu_new") in GELU_TANH
        and not setting(config, "qk_layernorm", False)
        and default_rotary(config)
    )


def family(config: Any) -> str | None:
    """The written-out decoder that takes a model: "llama", "gpt2", "phi", or None."""
    if llama_shaped(config):
        return "llama"
    if gpt2_shaped(config):
        return "gpt2"
    if phi_shaped(config):
        return "phi"
    return None


def default_rotary(config: Any) -> bool:
    rope = setting(config, "rope_parameters") or setting(config, "rope_scaling")
    return rope is None or rope.get("rope_type", "default") == "default"


def cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a model's KV cache."""
    if setting(config, "model_type") == "gpt2":
        heads = setting(config, "n_head")
        return setting(config, "n_layer"), heads, setting(config, "n_embd") // heads
    heads = setting(config, "num_attention_heads")
    head_dim = setting(config, "head_dim") or setting(config, "hidden_size") // heads
    kv_heads = setting(config, "num_key_value_heads") or heads
    return setting(config, "num_hidden_layers"), kv_heads, head_dim


def compilable(config: Any, dtype: str) -> bool:
    """Whether the compiled decoder (textgen/models/compiled.py) takes a model in ``dtype``: a
    family it has written out, int8, or int4 whose projections are whole blocks of 64 output
    rows (the int4 kernels' packed layout, so that q/k/v and gate/up can be joined into one
    matmul each)."""
    kind = family(config)
    if kind is None or dtype not in ("int8", "int4"):
        return False
    if dtype == "int8":
        return True
    _, kv_heads, head_dim = cache_shape(config)
    if kind == "gpt2":
        width = setting(config, "n_embd")
        inner = setting(config, "n_inner") or 4 * width
        rows: tuple[int, ...] = (width, inner)
    else:
        width, heads = setting(config, "hidden_size"), setting(config, "num_attention_heads")
        intermediate = setting(config, "intermediate_size")
        rows = (width, heads * head_dim, kv_heads * head_dim, intermediate)
    return all(count % 64 == 0 for count in rows)


def setting(config: Any, key: str, default: Any = None) -> Any:
    """A value of a transformers config or of config.json's dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)
