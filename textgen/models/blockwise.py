"""textgen's matmuls of block-quantized weights for x86-64 CPUs with AVX2 (kernels/blocks.cpp),
and their layouts: Q4 (Q4_1: 4-bit codes, a scale and a minimum per block of 32 input
columns, 0.625 bytes a weight) and Q8 (8-bit codes and a scale per block, 1.0625 bytes).

PyTorch's int4 kernels and Inductor's int4 and int8 templates convert every weight to a float
for one multiply-add each (and Inductor has no int4 template without AVX-512); at one row the
int8 template read the output layer's weights at about 15 GB/s. These kernels keep the weights
in their blocks and round the activations in the same blocks of 32 to two int8 digits (16-bit
precision; one, llama.cpp's precision, with TEXTGEN_ACTIVATION_BITS=8: ``set_activation_digits``),
so that 32 products take a few integer instructions, as llama.cpp's kernels do
(bench/kernels.py measures them against PyTorch's; bench/RESULTS.md has what they give the
compiled decoder). Their results are batch-invariant and the same bits with or without
AVX-512 (see the source).

The library is C++ built once with the system's compiler into the model cache (a few seconds),
then loaded into the process: as the ops ``torch.ops.textgen.q4_mm`` and ``q8_mm`` for eager
PyTorch and export, and as the C functions compiled decoders call directly. It also holds the
compiled decoders' batch-invariant attention (kernels/attention.cpp, ``attend``), which needs
the same instructions and the same build.
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

# The library's sources: the matmuls, and the batch-invariant attention compiled decoders call
# (kernels/attention.cpp).
SOURCES = [Path(__file__).with_name("kernels") / name for name in ("blocks.cpp", "attention.cpp")]
BLOCK = 32
GROUP = 8  # output rows packed together (kernels/blocks.cpp, kRows)
# Bytes of 8 output rows x 32 input columns (kernels/blocks.cpp, kBlockBytes), by the codes'
# bits: the last dimension of a packed tensor, which so names its format.
BLOCK_BYTES = {4: 160, 8: 272}
BITS = {size: bits for bits, size in BLOCK_BYTES.items()}
OPS = {4: "q4_mm", 8: "q8_mm"}

_lock = threading.Lock()
_loaded: Path | None = None
_digits = 2  # activation digits (set_activation_digits)


def bits_of(packed: torch.Tensor) -> int:
    """The codes' bits (4 or 8) of weights in the kernels' layout, from their last dimension
    (KeyError for any other)."""
    return BITS[packed.shape[-1]]


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
        parts = [
            *(source.read_bytes() for source in SOURCES),
            metadata.version("torch").encode(),
            sys.version.encode(),
        ]
        key = hashlib.sha256(b"\0".join([*parts, " ".join(options).encode()])).hexdigest()[:16]
        library = cache_root / "kernels" / f"textgen_blocks-{key}.so"
        if not library.is_file():
            try:
                build(library, options)
            except OSError:
                library = Path(tempfile.mkdtemp(prefix="textgen-kernels-")) / library.name
                build(library, options)
        # RTLD_GLOBAL: compiled decoders find aoti_torch_cpu_q4_mm among the process's symbols.
        ctypes.CDLL(os.fspath(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        torch.ops.load_library(os.fspath(library))
        torch.ops.textgen.set_activation_digits(_digits)
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
    """Compile the kernels' sources into ``library`` (written whole, then renamed)."""
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
        *map(os.fspath, SOURCES),
        *[f"-L{path}" for path in cpp_extension.library_paths()],
        "-lc10", "-ltorch_cpu",
        "-o", os.fspath(staging),
    ]  # fmt: skip
    log.info("building textgen's block-quantized kernels into %s: once, about 20 s", library)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        staging.unlink(missing_ok=True)
        names = ", ".join(source.name for source in SOURCES)
        raise RuntimeError(f"building {names} failed:\n{result.stderr[-4000:]}")
    os.replace(staging, library)


def register_fake() -> None:
    """The ops' output shapes for export (fake tensors, float32): the matmuls' [rows, output
    rows], attention's [rows, tokens, heads x dim]."""
    for op in OPS.values():

        @torch.library.register_fake(f"textgen::{op}")
        def _(x: torch.Tensor, packed: torch.Tensor, rows: int) -> torch.Tensor:
            return x.new_empty((x.shape[0], rows), dtype=torch.float32)

    @torch.library.register_fake("textgen::attend")
    def _(query: torch.Tensor, keys: Any, values: Any, mask: Any, scale: float) -> torch.Tensor:
        rows, heads, tokens, dim = query.shape
        return query.new_empty((rows, tokens, heads * dim), dtype=torch.float32)


def inductor_settings() -> dict[str, Any]:
    """What a compiled decoder that calls the kernels needs from Inductor: their C declarations
    (torch._inductor.config.aot_inductor.custom_ops_to_c_shims)."""
    shims = {
        getattr(torch.ops.textgen, op).default: [
            f"AOTITorchError aoti_torch_cpu_{op}(AtenTensorHandle x, AtenTensorHandle packed, "
            "int64_t rows, AtenTensorHandle* ret)"
        ]
        for op in OPS.values()
    }
    shims[torch.ops.textgen.attend.default] = [
        "AOTITorchError aoti_torch_cpu_attend(AtenTensorHandle query, AtenTensorHandle keys, "
        "AtenTensorHandle values, AtenTensorHandle mask, double scale, AtenTensorHandle* ret)"
    ]
    return {"aot_inductor.custom_ops_to_c_shims": shims}


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


def q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [rows, columns] rounded to 8 bits in groups of BLOCK columns: the codes
    1-255 [rows, groups, BLOCK] (float) and each group's scale [rows, groups];
    ``w = (code - 128) * scale``."""
    rows, columns = weight.shape
    groups = weight.reshape(rows, columns // BLOCK, BLOCK)
    # The scale as stored (float16), which the codes are rounded against; a block too small for
    # float16's scales (under 7.6e-6) is zeros.
    scale = (groups.abs().amax(-1) / 127).clamp(max=65504).half().float()
    ratio = torch.where(scale[..., None] > 0, groups / scale[..., None], torch.zeros(()))
    return torch.round(ratio).clamp(-127, 127) + 128, scale


def pack(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` [rows, columns] (columns a multiple of 32) in the kernel's layout of ``bits``
    (4 or 8): [ceil(rows / 8), blocks of 32 columns, BLOCK_BYTES[bits]] uint8 (rows padded with
    zeros to a multiple of 8). Per 8 rows and block: their float16 scales (and minimums)
    [1 or 2][8], then the codes as vectors of 8 rows x 4 bytes (kernels/blocks.cpp): for Q4
    vector k's byte i of a row holds columns 8k + i (low nibble) and 8k + 4 + i, for Q8 vector
    k's byte i column 4k + i."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    weight = torch.cat([weight, weight.new_zeros(-rows % GROUP, columns)])
    groups, blocks = weight.shape[0] // GROUP, columns // BLOCK
    if bits == 4:
        codes, scale, low = int4_groups(weight)
        nibbles = codes.to(torch.uint8).reshape(-1, blocks, 4, 2, 4)  # [.., k, high, i]
        code_bytes = nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)  # [rows, blocks, 4, 4]
        scales = torch.stack([scale, low], dim=-1)  # [rows, blocks, 2]
    else:
        codes, scale = q8_blocks(weight)
        code_bytes = codes.to(torch.uint8).reshape(-1, blocks, 8, 4)
        scales = scale[..., None]
    kinds, vectors = scales.shape[-1], code_bytes.shape[2]
    scale_bytes = (
        scales.to(torch.float16)
        .reshape(groups, GROUP, blocks, kinds)
        .permute(0, 2, 3, 1)  # [groups, blocks, kind, row]
        .contiguous()
        .view(torch.uint8)
        .reshape(groups, blocks, kinds * 2 * GROUP)
    )
    vector_bytes = (
        code_bytes.reshape(groups, GROUP, blocks, vectors, 4)
        .permute(0, 2, 3, 1, 4)  # [groups, blocks, vector, row, byte]
        .reshape(groups, blocks, vectors * 4 * GROUP)
    )
    return torch.cat([scale_bytes, vector_bytes], dim=-1).contiguous()


def unpack(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The float32 weights [rows, columns] that ``packed`` stands for."""
    groups, blocks, _ = packed.shape
    bits = bits_of(packed)
    kinds = 2 if bits == 4 else 1  # float16 values a row and block: scale (and minimum)
    scales = packed[..., : kinds * 2 * GROUP].contiguous().view(torch.float16)
    # [groups, blocks, kind, row] -> [rows, blocks, kind, 1]
    scales = scales.reshape(groups, blocks, kinds, GROUP).permute(0, 3, 1, 2).float()
    scales = scales.reshape(groups * GROUP, blocks, kinds, 1)
    vectors = packed[..., kinds * 2 * GROUP :].reshape(groups, blocks, -1, GROUP, 4)
    if bits == 4:  # [.., vector, high, row, byte]: columns 8 vector + 4 high + byte
        vectors = torch.stack([vectors & 0x0F, vectors >> 4], dim=3)
        codes = vectors.permute(0, 4, 1, 2, 3, 5).reshape(groups * GROUP, blocks, BLOCK).float()
        weights = codes * scales[:, :, 0] + scales[:, :, 1]
    else:
        codes = vectors.permute(0, 3, 1, 2, 4).reshape(groups * GROUP, blocks, BLOCK).float()
        weights = (codes - 128) * scales[:, :, 0]
    return weights.reshape(groups * GROUP, blocks * BLOCK)[:rows]


def matmul(x: torch.Tensor, packed: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` [.., columns] times the weights ``packed`` of ``rows`` output rows, transposed:
    [.., rows] float32 (the format is the packed tensor's: its last dimension)."""
    op = getattr(torch.ops.textgen, OPS[bits_of(packed)])
    return op(x.reshape(-1, x.shape[-1]).float(), packed, rows).reshape(*x.shape[:-1], rows)


def set_activation_digits(digits: int) -> None:
    """Round every later matmul's activations in this process to ``digits`` int8 digits: 2
    (16-bit precision, the default) or 1 (llama.cpp's 8-bit: half the integer work, which is
    most of a many-row step; see kernels/blocks.cpp). Applies now if the library is loaded,
    else when ``load`` loads it."""
    global _digits
    if digits not in (1, 2):
        raise ValueError(f"activation digits are 1 or 2, not {digits}")
    with _lock:
        _digits = digits
        if _loaded is not None:
            torch.ops.textgen.set_activation_digits(digits)


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Batch-invariant attention (kernels/attention.cpp): ``query`` [rows, heads, tokens, dim]
    over the first ``mask.shape[-1]`` columns of the cache's ``keys`` and ``values`` [rows, kv
    heads, capacity, dim] where ``mask`` [rows, 1, tokens, columns] is true; [rows, tokens,
    heads x dim] float32."""
    return torch.ops.textgen.attend(query, keys, values, mask, scale)
