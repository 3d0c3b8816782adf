"""What this machine can run, torch-free (the cache's keys and the weight formats' defaults
depend on it): the CPU's vector instruction sets, a C++ compiler, and so which int4 and int8
kernels."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

# The instruction sets of Inductor's AVX-512 code (its VecAVX512).
AVX512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"}
# The instructions textgen's block-quantized kernels (blockwise.py) are built with.
BLOCKS_NEEDS = {"avx2", "fma", "f16c"}
# Their weight layouts and C functions: part of the quantized cache file's key, and so of the
# compiled decoders' that call the functions. Bump when either changes.
BLOCKS_FORMAT = "blocks.2"


def compiler_available() -> bool:
    """Compiled decoders are C++ that Inductor builds with the system's compiler."""
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def cpu_flags() -> str:
    """The CPU's vector instruction sets, as /proc/cpuinfo names them ("" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith("flags"):
            names = line.split()[2:]
            return " ".join(sorted(f for f in names if f.startswith(("avx", "amx", "fma", "f16c"))))
    return ""


def blocks_runnable(flags: set[str]) -> bool:
    """Whether a machine whose CPU has the instruction sets ``flags`` (cpu_flags) can build and
    run textgen's block-quantized kernels: x86-64 with AVX2, FMA and F16C, and a C++ compiler."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and BLOCKS_NEEDS <= flags and compiler_available()


_unbuildable = False  # this process could not build them (see blocks_unbuildable)


def blocks_unbuildable() -> None:
    """This process could not build textgen's kernels (blockwise.load): from now on int4 and
    int8 weights take PyTorch's kernels, and the cache keys say so."""
    global _unbuildable
    _unbuildable = True


def blocks_preferred() -> bool:
    """Whether int4 and int8 weights take textgen's kernels (quantize.BlockLinear) rather than
    PyTorch's (Int4Linear, Int8Linear): wherever they run. At one row they read the weights
    1.3-2.3x as fast as PyTorch's kernels and Inductor's templates (the int8 template read the
    output layer at 15 GB/s); 16-row compiled steps are 1.5-1.9x as fast in int8 as with
    Inductor's int8 template, and 1.2-1.6x in int4 as with its AVX-512 int4 template (Zen 4,
    bench/RESULTS.md); their activations keep 16-bit precision, where PyTorch's round them to
    bfloat16. Not once they failed to build here."""
    return not _unbuildable and blocks_runnable(set(cpu_flags().split()))
