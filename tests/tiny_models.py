"""Tiny random causal LMs with a locally trained tokenizer, built in seconds for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. Once upon a time there was a small cat.",
    "Hello world! Numbers 0123456789 and punctuation: ,.;?!'\"()[]{}",
    "Accents é à ü ñ, CJK 日本語, emoji 🙂 and newlines\n\n",
]


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (every string encodes) with ChatML special tokens."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_llama(
    path: Path, seed: int = 0, max_positions: int = 256, blocks: bool = False
) -> Path:
    """A 2-layer Llama with a chat template; no pad token (the server must supply one).

    With ``blocks``, wider (128) and with 64-wide heads, so every projection is whole blocks of
    64 output rows, as the compiled int4 decoder wants (architecture.compilable)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    width, heads = (128, 2) if blocks else (32, 4)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(
    path: Path, seed: int = 1, max_positions: int = 64, blocks: bool = False
) -> Path:
    """A 2-layer GPT-2 without a chat template and a short context (with ``blocks``, 64 wide:
    whole int4 blocks)."""
    tokenizer = build_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64 if blocks else 32,
        n_layer=2,
        n_head=2,
        n_positions=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_phi(path: Path, seed: int = 2) -> Path:
    """A 2-layer Phi: rotary embeddings on half of each head, attention and MLP side by side."""
    tokenizer = build_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        partial_rotary_factor=0.5,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    PhiForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_neox(path: Path) -> Path:
    """A 2-layer GPT-NeoX: a family the compiled decoder has not written out."""
    tokenizer = build_tokenizer(chat_template=False)
    torch.manual_seed(3)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
