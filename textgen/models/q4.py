"""textgen's int4 x int8 matmul for x86-64 CPUs with AVX2 (kernels/q4q8.cpp), and its layout.

PyTorch's int4 kernels and Inductor's int4 and int8 templates convert every weight to a float
for one multiply-add each (and Inductor has no int4 template without AVX-512). This kernel
keeps the weights in Q4_1 blocks (0.625 bytes a weight against int8's 1.0) and rounds the
activations to int8 in the same blocks of 32, so that 32 products are one or two integer
instructions, as llama.cpp does (bench/kernels.py measures it against PyTorch's kernels;
bench/RESULTS.md has what it gives the compiled decoder). Its results are batch-invariant and
the same bits with or without AVX-512 (see the source).

The library is C++ built once with the system's compiler into the model cache (a few seconds),
then loaded into the process: as the op ``torch.ops.textgen.q4q8_mm`` for eager PyTorch and
export, and as the C function compiled decoders call directly.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from textgen.models.cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "q4q8.cpp"
BLOCK = 32
# Bytes of 4 output rows x 32 input columns (kernels/q4q8.cpp kBlockBytes): 0.625 a weight.
BLOCK_BYTES = 80
# The declaration Inductor writes into a compiled decoder that calls the kernel
# (torch._inductor.config.aot_inductor.custom_ops_to_c_shims).
C_SHIM = (
    "AOTITorchError aoti_torch_cpu_q4q8_mm(AtenTensorHandle x, AtenTensorHandle packed, "
    "int64_t columns, AtenTensorHandle* ret)"
)

_lock = threading.Lock()
_loaded: Path | None = None


def load(cache_root: Path) -> Path:
    """Build the kernel library into ``cache_root``/kernels (once) and load it; returns its path.

    Keyed by the source, the torch and Python versions and the compiler options. Workers that
    build it at once each write their own file and rename it into place (the same bytes). A
    cache that cannot be written (mounted read-only) gets it built into a temporary directory
    instead."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        options = machine_options()
        parts = [SOURCE.read_bytes(), metadata.version("torch").encode(), sys.version.encode()]
        key = hashlib.sha256(b"\0".join([*parts, " ".join(options).encode()])).hexdigest()[:16]
        library = cache_root / "kernels" / f"textgen_q4q8-{key}.so"
        if not library.is_file():
            try:
                build(library, options)
            except OSError:
                library = Path(tempfile.mkdtemp(prefix="textgen-kernels-")) / library.name
                build(library, options)
        # RTLD_GLOBAL: compiled decoders find aoti_torch_cpu_q4q8_mm among the process's symbols.
        ctypes.CDLL(os.fspath(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        torch.ops.load_library(os.fspath(library))
        register_fake()
        _loaded = library
        return library


def machine_options() -> list[str]:
    """Compiler options for this CPU beyond AVX2: with AVX-512 VL and VNNI, one instruction per
    32 products and 32 vector registers (4 activation rows per unpacking of the weights, not 2).
    The results are the same bits either way (the integer dot products are exact)."""
    flags = set(cpu_flags().split())
    return ["-mavx512vl", "-mavx512vnni"] if {"avx512vl", "avx512_vnni"} <= flags else []


def build(library: Path, options: list[str]) -> None:
    """Compile kernels/q4q8.cpp into ``library`` (written whole, then renamed)."""
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    staging = library.with_name(f"{library.stem}.{os.getpid()}.partial.so")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        os.environ.get("CXX", "c++"),
        "-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c", *options, "-fopenmp",
        "-fPIC", "-shared", "-std=c++20",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{path}" for path in cpp_extension.include_paths()],
        os.fspath(SOURCE),
        *[f"-L{path}" for path in cpp_extension.library_paths()],
        "-lc10", "-ltorch_cpu",
        "-o", os.fspath(staging),
    ]  # fmt: skip
    log.info("building textgen's int4 x int8 kernel into %s: once, about 15 s", library)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        staging.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed:\n{result.stderr[-4000:]}")
    os.replace(staging, library)


def register_fake() -> None:
    """The op's output shape for export (a fake tensor: [rows, output rows] float32)."""

    @torch.library.register_fake("textgen::q4q8_mm")
    def _(x: torch.Tensor, packed: torch.Tensor, columns: int) -> torch.Tensor:
        return x.new_empty((x.shape[0], 4 * packed.shape[0]), dtype=torch.float32)


def inductor_settings() -> dict[str, Any]:
    """What a compiled decoder that calls the kernel needs from Inductor: the C declaration."""
    return {"aot_inductor.custom_ops_to_c_shims": {torch.ops.textgen.q4q8_mm.default: [C_SHIM]}}


def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` [rows, columns] rounded to 4 bits in groups of BLOCK columns: the codes
    0-15 [rows, groups, BLOCK] (float), each group's scale and minimum [rows, groups];
    ``w = code * scale + minimum``."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // BLOCK, BLOCK)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15)
    return codes, scale, low


def quantized(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [rows, columns] (rows a multiple of 4, columns of 64) in the kernel's layout:
    [rows / 4, blocks of 32 columns, BLOCK_BYTES] uint8, by groups of 8 blocks (a last group
    may hold fewer): for each 4 rows and group the rows' float16 scales and minimums
    [4][2][blocks], then the group's pairs of blocks' codes, each [4 rows][32] (byte j of a
    block: column j in the low nibble, j + 16 in the high)."""
    rows, columns = weight.shape
    codes, scale, low = int4_groups(weight.detach().float())
    nibbles = codes.to(torch.uint8)
    bytes_ = nibbles[..., :16] | (nibbles[..., 16:] << 4)  # [rows, blocks, 16]
    quads, blocks = rows // 4, columns // BLOCK
    parts = []
    for start in range(0, blocks, 8):
        size = min(8, blocks - start)
        group = slice(start, start + size)
        dm = torch.stack([scale[:, group], low[:, group]], dim=1).to(torch.float16)
        parts.append(dm.reshape(quads, 8 * size).view(torch.uint8))
        pairs = bytes_[:, group].reshape(quads, 4, size // 2, 32).permute(0, 2, 1, 3)
        parts.append(pairs.reshape(quads, 64 * size))
    return torch.cat(parts, dim=1).reshape(quads, blocks, BLOCK_BYTES).contiguous()


def dequantized(packed: torch.Tensor) -> torch.Tensor:
    """The float32 weights [rows, columns] that ``packed`` stands for."""
    quads, blocks, _ = packed.shape
    flat, offset, parts = packed.reshape(quads, -1), 0, []
    for start in range(0, blocks, 8):
        size = min(8, blocks - start)
        dm = flat[:, offset : offset + 16 * size].contiguous().view(torch.float16)
        dm = dm.reshape(quads * 4, 2, size, 1).float()
        offset += 16 * size
        pairs = flat[:, offset : offset + 64 * size].reshape(quads, size // 2, 4, 32)
        bytes_ = pairs.permute(0, 2, 1, 3).reshape(quads * 4, size, 16)
        offset += 64 * size
        codes = torch.cat([bytes_ & 0x0F, bytes_ >> 4], dim=-1).float()
        parts.append((codes * dm[:, 0] + dm[:, 1]).reshape(quads * 4, 32 * size))
    return torch.cat(parts, dim=1)


def matmul(x: torch.Tensor, packed: torch.Tensor, columns: int) -> torch.Tensor:
    """``x`` [rows, columns] times the weights ``packed`` of ``columns`` input columns,
    transposed: [rows, output rows] float32."""
    return torch.ops.textgen.q4q8_mm(x.float(), packed, columns)
