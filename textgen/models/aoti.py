"""A compiled decoder package run through AOTInductor's C interface, with the GIL released.

torch's own loader (``torch._inductor.aoti_load_package``) holds the GIL for the whole call: a
prefill of 32 rows x 40 tokens stopped every other thread of the worker for 1.9 s, so the
worker's main loop could neither accept nor refuse a connection, and no request thread could
send a token, until the step ended (bench/RESULTS.md, reliability). ctypes releases the GIL
around a foreign call; the model library's entry points (``aoti_runtime/interface.h``) are a
C ABI that torch keeps stable across versions. Outputs are bit-equal to torch's loader and a
decode step takes the same time (7.6 against 7.7 ms, min of 120 one-row steps).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class CompiledPackage:
    """The model of an AOTInductor package (.pt2), called as torch's loader's model is, with
    tensors or lists of tensors as arguments; returns its one output tensor."""

    # The KV cache buffers' type the decoder was compiled for: compiled.open_package sets it
    # (no default: AOTInductor does not check it, so a wrong one would read the bytes wrongly).
    cache_dtype: torch.dtype

    def __init__(self, path: Path) -> None:
        self.library = load_library(path)
        self.container = ctypes.c_void_p()
        check(
            self.library.AOTInductorModelContainerCreateWithDevice(
                ctypes.byref(self.container), ctypes.c_size_t(1), b"cpu", None
            ),
            "create the model",
        )
        outputs = ctypes.c_size_t()
        check(
            self.library.AOTInductorModelContainerGetNumOutputs(
                self.container, ctypes.byref(outputs)
            ),
            "count the outputs",
        )
        if outputs.value != 1:
            raise RuntimeError(f"a decoder package has one output, not {outputs.value}")
        self.run = self.library.AOTInductorModelContainerRun

    def __call__(self, *args: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        flat: list[torch.Tensor] = []
        for arg in args:
            flat.extend(arg) if isinstance(arg, list) else flat.append(arg)
        # New handles to the same tensors: the run takes (and frees) them.
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(flat)
        inputs = (ctypes.c_void_p * len(handles))(*[_capsule_pointer(h, None) for h in handles])
        output = (ctypes.c_void_p * 1)()
        check(
            self.run(self.container, inputs, len(handles), output, 1, None, None), "run the model"
        )
        capsule = _new_capsule(output[0], None, None)
        (tensor,) = torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([capsule])
        return tensor

    def __del__(self) -> None:
        container = getattr(self, "container", None)
        if container:
            self.library.AOTInductorModelContainerDelete(container)


def load_library(path: Path) -> ctypes.CDLL:
    """The package's model library, loaded from a private copy that is removed at once (the
    mapping outlives the file), so a read-only cache serves and nothing is left behind."""
    with zipfile.ZipFile(path) as package:
        names = [name for name in package.namelist() if name.endswith(".so")]
        if len(names) != 1:
            raise RuntimeError(f"expected one model library in the package, found {len(names)}")
        with tempfile.TemporaryDirectory(prefix="textgen-decoder-") as scratch:
            library = Path(scratch) / "model.so"
            with package.open(names[0]) as source, library.open("wb") as target:
                while block := source.read(1 << 24):
                    target.write(block)
            return ctypes.CDLL(os.fspath(library))  # a CDLL's calls release the GIL


def check(error: Any, doing: str) -> None:
    """AOTInductor's calls answer 0, or an error it has printed to stderr."""
    if error != 0:
        raise RuntimeError(f"the compiled decoder could not {doing} (AOTInductor error {error})")
