"""textgen's block-quantized kernels (textgen/models/blockwise.py) against PyTorch's int8 and
int4 kernels and Inductor's templates.

Two measurements, each alternating the kernels in one process (min of 6 rounds):
- ``--matmuls``: the kernels alone (Q4 and Q8) against ``_weight_int8pack_mm`` and (AVX-512
  only) ``_weight_int4pack_mm_for_cpu`` on the seeds' matmul shapes, output layers included,
  at 1 and 16 rows, over enough copies of the weights (about 100 MB) that they come from
  memory, not from the cache (as in a decode step, where every layer's weights are read once).
- compiled one-token steps of whole models (the default): int8 and int4 in PyTorch's formats
  (Inductor's int8 template; its int4 template, AVX-512 only) against textgen's ("q8": every
  layer Q8; "q4": Q4 and the output layer Q8; "q4-a8": q4 with one activation digit,
  TEXTGEN_ACTIVATION_BITS=8), at 1 and 16 rows, over a KV cache of ``--columns`` positions;
  ``--formats q4,q4-a8`` for some of them.

Usage: python bench/kernels.py [--matmuls] [--models smollm2-135m-instruct,/path/to/gpt2]
       [--columns 80] [--formats int8,q8,q4,q4-a8,int4] [--out bench/out/kernels.json]
       (needs AVX2, FMA, F16C and c++)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from serving import REPO

from textgen.models import blockwise, cpu
from textgen.models.cache import ModelCache
from textgen.models.compiled import example_inputs, program_class
from textgen.models.cpu import cpu_flags
from textgen.models.loading import load_model
from textgen.models.quantize import INT4_GROUP
from textgen.models.specs import make_spec
from textgen.runtime import configure_torch

# (name, output rows N, input columns K): GPT-2's fused q/k/v, its MLP, its output layer, the
# embedded model's fused q/k/v, gate and up, down projections and output layer.
SHAPES = [
    ("gpt2 qkv", 2304, 768),
    ("gpt2 mlp up", 3072, 768),
    ("gpt2 mlp down", 768, 3072),
    ("gpt2 output", 50257, 768),
    ("smollm2 qkv", 960, 576),
    ("smollm2 gate+up", 3072, 576),
    ("smollm2 down", 576, 1536),
    ("smollm2 output", 49152, 576),
]
WEIGHTS = 100_000_000  # at least so many weights in copies, more than any cache holds


def best_of(runs: dict[str, Callable[[], object]], calls: int, rounds: int = 6) -> dict[str, float]:
    """The fastest mean of ``calls`` calls per entry, in ms, the entries alternated."""
    best = dict.fromkeys(runs, float("inf"))
    for fn in runs.values():
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / calls * 1e3)
    return best


def matmuls(avx512: bool) -> list[dict[str, Any]]:
    results = []
    for name, n, k in SHAPES:
        copies = max(2, WEIGHTS // (n * k))
        weights = [torch.randn(n, k) * 0.02 for _ in range(copies)]
        q4, q8 = ([blockwise.pack(w, bits) for w in weights] for bits in (4, 8))
        del weights
        int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
        scale = torch.rand(n).to(torch.bfloat16)
        int4 = [
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1
            )
            for _ in range(copies if avx512 and n % 16 == 0 else 0)
        ]
        scale_zero = torch.rand(k // INT4_GROUP, n, 2).to(torch.bfloat16)
        for rows in (1, 16):
            x = torch.randn(rows, k)
            x16 = x.to(torch.bfloat16)
            runs: dict[str, Callable[[], object]] = {
                "q4": lambda x=x, ws=q4, n=n: [blockwise.matmul(x, w, n) for w in ws],
                "q8": lambda x=x, ws=q8, n=n: [blockwise.matmul(x, w, n) for w in ws],
                "int8pack": lambda x=x16, ws=int8, s=scale: [
                    torch.ops.aten._weight_int8pack_mm(x, w, s) for w in ws
                ],
            }
            if int4:
                runs["int4pack"] = lambda x=x16, ws=int4, s=scale_zero: [
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, s) for w in ws
                ]
            ms = best_of(runs, calls=2 if n * k > 10_000_000 else 5)
            result: dict[str, Any] = {"matmul": name, "rows": rows}
            result.update({f"{kernel}_ms": round(ms[kernel] / copies, 4) for kernel in runs})
            for bits, packed in (("q4", q4), ("q8", q8)):
                result[f"{bits}_weight_gb_s"] = round(packed[0].nbytes * copies / ms[bits] / 1e6, 1)
            result["q8_over_int8pack"] = round(ms["int8pack"] / ms["q8"], 2)
            if int4:
                result["q4_over_int4pack"] = round(ms["int4pack"] / ms["q4"], 2)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def step_inputs(program: Any, rows: int, columns: int, dtype: torch.dtype) -> list[Any]:
    """One new token a row over a cache of ``columns`` positions of ``dtype`` (the compiled
    decoder's ``cache_dtype``)."""
    inputs = list(example_inputs(program, rows=rows, tokens=1))
    buffers = [
        torch.zeros(rows, program.kv_heads, columns, program.head_dim, dtype=dtype)
        for _ in range(program.layer_count)
    ]
    at = 2 if program.rotary_dim is None else 4  # the mask's index
    inputs[at - 1] = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    inputs[at], inputs[at + 1] = buffers, [buffer.clone() for buffer in buffers]
    inputs[at + 2], inputs[at + 3] = torch.tensor([columns - 1]), torch.arange(1)
    return inputs


@contextmanager
def kernels(textgens: bool) -> Iterator[None]:
    """int4 and int8 weights in textgen's kernels (BlockLinear) or PyTorch's, whatever the CPU."""
    with mock.patch.object(cpu, "blocks_preferred", lambda: textgens):
        yield


# Format: (dtype, in textgen's kernels, activation digits).
FORMATS = {
    "int8": ("int8", False, 2),
    "q8": ("int8", True, 2),
    "q4": ("int4", True, 2),
    "q4-a8": ("int4", True, 1),
    "int4": ("int4", False, 2),  # Inductor's int4 template: AVX-512 only
}


def steps(models: list[str], columns: int, avx512: bool, names: list[str]) -> list[dict[str, Any]]:
    cache = ModelCache(Path.home() / ".cache" / "textgen")
    formats = {name: FORMATS[name] for name in names if avx512 or name != "int4"}
    results = []
    for source in models:
        loaded = {}
        for name, (dtype, textgens, _) in formats.items():
            with kernels(textgens):
                loaded[name] = load_model(make_spec(source, dtype=dtype), cache, compiled=True)

        model = next(iter(loaded.values())).model
        program = program_class(model)(model)
        for rows in (1, 16):
            inputs = {
                name: step_inputs(program, rows, columns, one.program.cache_dtype)
                for name, one in loaded.items()
            }
            with torch.inference_mode():
                ms = best_of(
                    {
                        name: lambda one=one, inputs=inputs[name], digits=formats[name][2]: (
                            blockwise.set_activation_digits(digits),
                            one.program(*inputs),
                        )
                        for name, one in loaded.items()
                    },
                    calls=20 if rows == 1 else 4,
                )
            result: dict[str, Any] = {"model": Path(source).name, "rows": rows, "columns": columns}
            result.update({f"{name}_ms": round(ms[name], 2) for name in loaded})
            if {"int8", "q8"} <= set(ms):
                result["q8_over_int8"] = round(ms["int8"] / ms["q8"], 3)
            others = [name for name in ms if name != "q4"]
            if "q4" in ms:
                result.update({f"q4_over_{name}": round(ms[name] / ms["q4"], 3) for name in others})
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--matmuls", action="store_true", help="the kernel alone")
    parser.add_argument("--models", default="smollm2-135m-instruct")
    parser.add_argument("--columns", type=int, default=80)
    parser.add_argument("--formats", default=",".join(FORMATS), help="of " + ", ".join(FORMATS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "kernels.json")
    args = parser.parse_args()
    flags = set(cpu_flags().split())
    if not cpu.blocks_runnable(flags):
        raise SystemExit("textgen's kernels need x86-64 with AVX2, FMA, F16C and c++")
    avx512 = cpu.AVX512 <= flags
    configure_torch(2)
    torch.manual_seed(0)
    blockwise.load(Path.home() / ".cache" / "textgen")
    if args.matmuls:
        results = matmuls(avx512)
    else:
        results = steps(args.models.split(","), args.columns, avx512, args.formats.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {cpu_flags()}"
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=1))


if __name__ == "__main__":
    main()
