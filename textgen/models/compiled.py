"""The decoder of a model with int8 or int4 weights, compiled ahead of time (AOTInductor): the
families written out in textgen/models/decoders (Llama-shaped, GPT-2, Phi).

Eager PyTorch spends most of a one-token step here on per-operation cost and on the int8 kernel
(``_weight_int8pack_mm``: 13 ms for the embedded model's matmuls at one row). Inductor, with its
C++ GEMM templates (``max_autotune``), generates the int8 weight-only matmuls and fuses the small
operations between them: the whole one-row step takes 6.4 ms against 22 eager (bench/RESULTS.md).
Compiling takes about two minutes on two cores, so it happens once, into the model cache (like
the quantized weights), and every later start loads the package in under a second.

The program runs any number of new tokens per row over the batch's KV cache buffers (written in
place): decode steps (one token) and prefills (the prompt) use the same code. Its results are not
bit-equal to transformers' eager forward on the same int8 weights (another summation order, bf16
rounding in other places); tests bound the difference.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

import torch

from textgen.models import blockwise, cpu
from textgen.models.aoti import CompiledPackage
from textgen.models.architecture import cache_shape, compilable, family
from textgen.models.cache import ModelCache
from textgen.models.cpu import compiler_available
from textgen.models.decoders.base import Program, cache_dtype_of
from textgen.models.decoders.gpt2 import GPT2Program
from textgen.models.decoders.llama import LlamaProgram
from textgen.models.decoders.phi import PhiProgram
from textgen.models.quantize import BlockLinear, Int4Linear, Int8Linear
from textgen.models.sources import damaged
from textgen.models.tuning import Tuning, warn_if_slow, write_record
from textgen.models.tuning import check as tuning_check

log = logging.getLogger(__name__)

INDUCTOR_SETTINGS = {
    # C++ GEMM templates: int8 weight-only matmuls as generated code, not the eager kernel.
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    # Weights become constants, so the templates can lay them out for their kernels.
    "freezing": True,
    # The timings go to the package's tuning record; Inductor's own reports of them (blocks
    # on stderr for each matmul) would bury the log of a first start.
    "autotune_num_choices_displayed": 0,
    "max_autotune_report_choices_stats": False,
}


class Family(Protocol):
    """A written-out decoder's class: built from a model, and naming its projections."""

    def __call__(self, model: Any) -> Program: ...

    def projections(self, model: Any) -> list[Any]: ...


PROGRAMS: dict[str, Family] = {"llama": LlamaProgram, "gpt2": GPT2Program, "phi": PhiProgram}


def supports(model: Any, dtype: str) -> bool:
    """Models the compiled decoder takes (``architecture.compilable``) whose every linear layer
    holds ``dtype`` weights as quantize.py stores them: int8, or int4 with the output layer in
    int8 (which int4 keeps there); each in textgen's kernels' format or in PyTorch's."""
    if not compilable(model.config, dtype):
        return False

    def holds(linear: Any, bits: int) -> bool:
        if isinstance(linear, BlockLinear):
            return linear.bits == bits
        return isinstance(linear, Int4Linear if bits == 4 else Int8Linear)

    projections = program_class(model).projections(model)
    bits = 4 if dtype == "int4" else 8
    return holds(model.lm_head, 8) and all(holds(linear, bits) for linear in projections)


def program_class(model: Any) -> Family:
    kind = family(model.config)
    assert kind is not None, "not a family the compiled decoder takes"
    return PROGRAMS[kind]


def example_inputs(program: Program, rows: int = 8, tokens: int = 2) -> tuple[Any, ...]:
    """Inputs of the shapes the program is exported with (every size is declared dynamic).

    Their 16 rows x tokens are the size the matmul templates are tuned for: 16 decoding rows
    (TEXTGEN_MAX_BATCH's default). Tuned for 6 instead, a 16-row step took 7-8% longer here
    (46.8 against 43.0 ms at 40 columns) and one row the same."""
    capacity = tokens + 5
    buffers = [
        torch.zeros(rows, program.kv_heads, capacity, program.head_dim, dtype=program.cache_dtype)
        for _ in range(program.layer_count)
    ]
    rotary: tuple[torch.Tensor, ...] = ()
    if program.rotary_dim is not None:
        rotary = (
            torch.ones(rows, tokens, program.rotary_dim),
            torch.zeros(rows, tokens, program.rotary_dim),
        )
    return (
        torch.zeros(rows, tokens, program.width),
        *rotary,
        torch.ones(rows, 1, tokens, tokens + 1, dtype=torch.bool),
        buffers,
        [buffer.clone() for buffer in buffers],
        torch.arange(1, tokens + 1),
        torch.arange(tokens),
    )


def kernel_attention(head_dim: int, deterministic: bool) -> bool:
    """Whether a compiled decoder's batch-invariant attention is textgen's kernel
    (kernels/attention.cpp): where textgen's kernels run, for heads of 8 to 256 dimensions by 8
    (every seed model's); else PyTorch's padded matmuls (decoders/base.py ``attend``)."""
    fits = head_dim % 8 == 0 and head_dim <= 256
    return deterministic and fits and cpu.blocks_preferred()


def build_program(model: Any, deterministic: bool = True) -> Program:
    """The model's Program as it is compiled: ``deterministic``, with batch-invariant
    attention (decoders/base.py ``attend``), textgen's kernel where it runs."""
    program = program_class(model)(model).eval()
    program.invariant = deterministic
    program.kernel_attention = kernel_attention(program.head_dim, deterministic)
    return program


def compile_program(model: Any, target: Path, deterministic: bool = True) -> dict[str, Any]:
    """Export and compile the model's Program (``build_program``) into ``target`` (written
    whole, then renamed), its kernels chosen on robust timings, then checked against the eager
    Program (textgen/models/tuning.py). Returns the tuning record written beside it."""
    from torch.export import Dim

    program = build_program(model, deterministic)
    rows, tokens = Dim("rows", min=1, max=4096), Dim("tokens", min=1, max=1 << 16)
    keep = Dim("keep", min=1, max=1 << 16)
    capacity, columns = Dim("capacity", min=2, max=1 << 20), Dim("columns", min=2, max=1 << 20)
    per_layer = [{0: rows, 2: capacity}] * program.layer_count
    rotary = () if program.rotary_dim is None else ({0: rows, 1: tokens},) * 2
    shapes = (
        {0: rows, 1: tokens},
        *rotary,
        {0: rows, 2: tokens, 3: columns},
        per_layer,
        per_layer,
        {0: tokens},
        {0: keep},
    )
    with torch.no_grad():
        exported = torch.export.export(program, example_inputs(program), dynamic_shapes=shapes)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.stem}.{os.getpid()}.partial.pt2")
    settings = dict(INDUCTOR_SETTINGS)
    if program.kernel_attention or any(isinstance(m, BlockLinear) for m in model.modules()):
        settings.update(blockwise.inductor_settings())  # the decoder calls textgen's kernels
    tuning = Tuning()
    with tuning.robust():
        torch._inductor.aoti_compile_and_package(
            exported, package_path=str(staging), inductor_configs=settings
        )
    # A one-row decode step, compiled and eager (the step whose speed the weights decide).
    inputs = example_inputs(program, rows=1, tokens=1)
    package = open_package(model, staging, deterministic)
    assert package.cache_dtype == program.cache_dtype
    result = tuning_check(lambda: package(*inputs), lambda: program(*inputs))
    os.replace(staging, target)
    record = write_record(target, tuning, result)
    warn_if_slow(target, record)
    return record


def load_program(
    model: Any, model_dir: Path, dtype: str, cache: ModelCache, deterministic: bool = True
) -> CompiledPackage | None:
    """The compiled program for ``model`` in ``dtype`` (compiled into the cache the first
    time), or None when the model or the machine cannot have one."""
    if not supports(model, dtype):
        return None
    if not compiler_available():
        log.warning("no C++ compiler (c++ or $CXX): the %s decoder runs uncompiled, slower", dtype)
        return None
    target = cache.compiled_path(model_dir, dtype, deterministic)
    with cache.lock(f"compile-{target.name}"):
        if not target.is_file():
            log.info(
                "compiling the %s decoder of %s: once, about 1.5-3.5 minutes on 2 cores (a C++ "
                "build; later starts load it from the cache)",
                dtype, model_dir.name,
            )  # fmt: skip
            started = time.monotonic()
            compile_program(model, target, deterministic)
            log.info("compiled decoder written to %s (%.0f s)", target, time.monotonic() - started)
        else:
            warn_if_slow(target)
    try:
        return open_package(model, target, deterministic)
    except Exception as exc:
        raise damaged(target, exc) from exc


def open_package(model: Any, path: Path, deterministic: bool = True) -> CompiledPackage:
    """The compiled program of ``model`` at ``path``, which knows the KV cache buffers' type it
    was compiled for (Program.cache_dtype: not checked when it runs, so buffers of another type
    would be read as that one)."""
    package = CompiledPackage(path)
    head_dim = cache_shape(model.config)[2]
    package.cache_dtype = cache_dtype_of(kernel_attention(head_dim, deterministic))
    return package
