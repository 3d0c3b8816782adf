"""textgen's int4 x int8 matmul for AVX2 CPUs (kernels/q4q8.cpp): the int4 layout there.

On a CPU without AVX-512 PyTorch's int4 kernel is no faster than its int8 one, and Inductor's
int8 template converts every weight to float32 for one multiply-add each. This kernel keeps the
weights in Q4_1 blocks (0.625 bytes a weight against int8's 1.0) and rounds the activations to
int8 in the same blocks of 32, so that 32 products are one integer instruction, as llama.cpp
does on these CPUs (bench/kernels.py measured it against ``_weight_int8pack_mm``; bench/RESULTS.md
has what it gives the compiled decoder). Its results are batch-invariant (see the source).

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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "q4q8.cpp"
BLOCK = 32
# Bytes of 4 output rows x 256 input columns (kernels/q4q8.cpp kGroupBytes).
GROUP_BYTES = 128 + 4 * 128
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

    Keyed by the source, the torch version and the Python version. Workers that build it at
    once each write their own file and rename it into place (the same bytes). A cache that
    cannot be written (mounted read-only) gets it built into a temporary directory instead."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        source = SOURCE.read_bytes()
        key = hashlib.sha256(
            source + metadata.version("torch").encode() + sys.version.encode()
        ).hexdigest()[:16]
        library = cache_root / "kernels" / f"textgen_q4q8-{key}.so"
        if not library.is_file():
            try:
                build(library)
            except OSError:
                library = Path(tempfile.mkdtemp(prefix="textgen-kernels-")) / library.name
                build(library)
        # RTLD_GLOBAL: compiled decoders find aoti_torch_cpu_q4q8_mm among the process's symbols.
        ctypes.CDLL(os.fspath(library), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
        torch.ops.load_library(os.fspath(library))
        register_fake()
        _loaded = library
        return library


def build(library: Path) -> None:
    """Compile kernels/q4q8.cpp into ``library`` (written whole, then renamed)."""
    from torch.utils import cpp_extension

    library.parent.mkdir(parents=True, exist_ok=True)
    staging = library.with_name(f"{library.stem}.{os.getpid()}.partial.so")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        os.environ.get("CXX", "c++"),
        "-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c", "-fopenmp",
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
    [rows / 4, groups of 256 columns, GROUP_BYTES] uint8, for each 4 rows and group the rows'
    float16 scales and minimums [4][2][8], then the 4 pairs of blocks' codes [4 rows][32]
    (byte j of a block: column j in the low nibble, j + 16 in the high); padded with zeros."""
    rows, columns = weight.shape
    codes, scale, low = int4_groups(weight.detach().float())
    blocks, groups = columns // BLOCK, -(-columns // (8 * BLOCK))
    nibbles = codes.to(torch.uint8)
    bytes_ = torch.zeros(rows, groups * 8, 16, dtype=torch.uint8)
    bytes_[:, :blocks] = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    # [rows, groups, 4 pairs, 32] -> [rows / 4, groups, 4 pairs, 4 rows, 32]
    pairs = bytes_.reshape(rows // 4, 4, groups, 4, 32).permute(0, 2, 3, 1, 4)
    dm = torch.zeros(rows, groups * 8, 2, dtype=torch.float16)
    dm[:, :blocks, 0], dm[:, :blocks, 1] = scale, low
    # [rows, groups, 8, 2] -> [rows / 4, groups, 4 rows, 2, 8]
    scales = dm.reshape(rows // 4, 4, groups, 8, 2).permute(0, 2, 1, 4, 3)
    return torch.cat(
        [
            scales.contiguous().view(torch.uint8).reshape(rows // 4, groups, 128),
            pairs.reshape(rows // 4, groups, 512),
        ],
        dim=-1,
    ).contiguous()


def dequantized(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """The float32 weights [rows, columns] that ``packed`` stands for."""
    quads, groups, _ = packed.shape
    scales = packed[..., :128].contiguous().view(torch.float16).reshape(quads, groups, 4, 2, 8)
    scales = scales.permute(0, 2, 1, 4, 3).reshape(quads * 4, groups * 8, 2).float()
    pairs = packed[..., 128:].reshape(quads, groups, 4, 4, 32).permute(0, 3, 1, 2, 4)
    bytes_ = pairs.reshape(quads * 4, groups * 8, 16)
    codes = torch.cat([bytes_ & 0x0F, bytes_ >> 4], dim=-1).float()
    weight = codes * scales[..., :1] + scales[..., 1:]
    return weight.reshape(quads * 4, -1)[:, :columns]


def matmul(x: torch.Tensor, packed: torch.Tensor, columns: int) -> torch.Tensor:
    """``x`` [rows, columns] times the weights ``packed`` of ``columns`` input columns,
    transposed: [rows, output rows] float32."""
    return torch.ops.textgen.q4q8_mm(x.float(), packed, columns)
