"""What this machine can run, torch-free (the cache's keys and the weight formats' defaults
depend on it): the CPU's vector instruction sets, a C++ compiler, and so which int4 kernel."""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

# The instruction sets of Inductor's AVX-512 code (its VecAVX512).
AVX512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"}
# The instructions textgen's int4 x int8 kernel (q4.py) is built with.
Q4_NEEDS = {"avx2", "fma", "f16c"}
# That kernel's weight layout and C function: part of the quantized cache file's key, and so
# of the compiled decoders' that call the function. Bump when either changes.
Q4_FORMAT = "q4.4"


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


def q4_runnable(flags: set[str]) -> bool:
    """Whether a machine whose CPU has the instruction sets ``flags`` (cpu_flags) can build and
    run textgen's int4 kernel: x86-64 with AVX2, FMA and F16C, and a C++ compiler."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and Q4_NEEDS <= flags and compiler_available()


def q4_preferred(flags: set[str] | None = None) -> bool:
    """Whether int4 weights take textgen's kernel (quantize.Q4Linear) rather than PyTorch's
    (Int4Linear): where it runs and the CPU lacks AVX-512, where Inductor has no int4 template.
    It is faster than that template on a Zen 4 too (0.79x its step time at one row, 0.93x at
    16; bench/RESULTS.md), but rounding the activations to int8 changed the embedded model's
    greedy answers (the README's Paris example), so AVX-512 keeps the template."""
    flags = set(cpu_flags().split()) if flags is None else flags
    return q4_runnable(flags) and not AVX512 <= flags
