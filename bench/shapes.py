"""The seeds' models at their published shapes, with random weights, for speed comparisons.

The Hub is not reachable here, but a model's speed depends on its shape, not on its weights'
values: each model is built from its published configuration with random weights and the
embedded model's tokenizer (SmolLM2's, 49,152 tokens; a larger vocabulary is padded by
llama.cpp's converter, and TinyLlama, whose own is 32,000, gets 49,152), saved with
save_pretrained, and converted to GGUF by llama.cpp's own convert_hf_to_gguf.py and
llama-quantize (../shared/anchors/gguf-from-hf.sh), so both servers run the same weights.

Usage: python bench/shapes.py NAME [NAME ...] [--type Q4_0]   (names: see SHAPES)
Prints, per model, its directory and GGUF file (under bench/out/shapes/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from serving import REPO

OUT = REPO / "bench" / "out" / "shapes"
CONVERT = REPO.parent / "shared" / "anchors" / "gguf-from-hf.sh"
TOKENIZER_VOCABULARY = 49152

# The published configurations (config.json on the Hub) of the seeds' models.
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {"kind": "gpt2", "vocab_size": 50257},
    "distilgpt2": {"kind": "gpt2", "vocab_size": 50257, "n_layer": 6},
    "qwen2-0.5b": {
        "kind": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "tinyllama-1.1b": {
        "kind": "llama",
        "vocab_size": TOKENIZER_VOCABULARY,  # 32,000 in the original (see above)
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
    },
    "phi-2": {
        "kind": "phi",
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "max_position_embeddings": 2048,
        "partial_rotary_factor": 0.4,
        "layer_norm_eps": 1e-5,
    },
}


GENERIC_TOKENIZER = """
from pathlib import Path
import transformers

def _generic(path, *args, **kwargs):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(path, "tokenizer.json")))

transformers.AutoTokenizer.from_pretrained = _generic
"""


def build(name: str, target: Path) -> None:
    """Save a random-weight model of ``name``'s shape and the tokenizer into ``target``."""
    import torch
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PhiConfig,
        PhiForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    from textgen.config import settings_from_env
    from textgen.models.cache import ModelCache
    from textgen.models.sources import prepared_dir
    from textgen.models.specs import make_spec

    classes = {
        "gpt2": (GPT2Config, GPT2LMHeadModel),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "phi": (PhiConfig, PhiForCausalLM),
    }
    shape = dict(SHAPES[name])
    config_class, model_class = classes[shape.pop("kind")]
    torch.manual_seed(0)
    model = model_class(config_class(**shape)).to(torch.bfloat16)
    model.save_pretrained(target)
    embedded = prepared_dir(
        make_spec("smollm2-135m-instruct"), ModelCache(settings_from_env().model_cache)
    )
    if embedded is None:
        sys.exit("prepare the embedded model first (textgen pull): its tokenizer is reused")
    AutoTokenizer.from_pretrained(embedded).save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    if config["model_type"] == "gpt2":  # llama.cpp's GPT-2 converter reads n_ctx
        config["n_ctx"] = config["n_positions"]
        (target / "config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--type", default="Q4_0", help="llama-quantize's type for the GGUF")
    args = parser.parse_args()
    for name in args.names:
        target = OUT / name
        if not (target / "config.json").is_file():
            build(name, target)
        gguf = OUT / f"{name}.{args.type}.gguf"
        if not gguf.is_file():
            with tempfile.TemporaryDirectory() as hooks:
                # transformers picks a tokenizer class by model type (Qwen2Tokenizer, ...),
                # which re-splits SmolLM2's vocabulary its own way, and llama.cpp's converter
                # then does not recognise the pre-tokenizer: read tokenizer.json as it is.
                Path(hooks, "sitecustomize.py").write_text(GENERIC_TOKENIZER)
                path = os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH")]))
                env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": path}
                subprocess.run(
                    ["bash", str(CONVERT), str(target), str(gguf), args.type], env=env, check=True
                )
        print(json.dumps({"name": name, "source": str(target), "gguf": str(gguf)}), flush=True)


if __name__ == "__main__":
    main()
