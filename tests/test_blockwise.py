"""textgen's block-quantized kernels (textgen/models/blockwise.py, kernels/blocks.cpp), Q4 and
Q8: their arithmetic, their batch invariance, their layouts, and compiled decoders that call
them, served through HTTP.

The kernels are what int4 and int8 run on x86-64 CPUs with AVX2, FMA and F16C; the compiled
decoder's tests force them and PyTorch's kernels in turn (``cpu.blocks_preferred``), so every
machine that can run them checks both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, activation_digits, tiny_config
from tests.test_compiled import PROMPTS, assert_close_to_eager, step_by_step
from tests.test_engine import concurrently, post, text
from tests.tiny_models import save_tiny_llama
from textgen import create_app
from textgen.config import ConfigError
from textgen.engine.compiled import CompiledForward
from textgen.engine.kvcache import BatchCache
from textgen.models import blockwise, compiled, cpu
from textgen.models.cache import ModelCache
from textgen.models.cpu import blocks_runnable, cpu_flags
from textgen.models.loading import LoadedModel, load_model
from textgen.models.quantize import INT4_GROUP, BlockLinear, Int4Linear, Int8Linear
from textgen.models.specs import make_spec

NEEDS_KERNELS = pytest.mark.skipif(
    not blocks_runnable(set(cpu_flags().split())),
    reason="needs x86-64 with AVX2, FMA, F16C and c++",
)
pytestmark = NEEDS_KERNELS


@pytest.fixture(scope="module", autouse=True)
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return blockwise.load(tmp_path_factory.mktemp("kernel-cache"))


@pytest.fixture(params=[2, 1], ids=["two-digits", "one-digit"])
def digits(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process's activation digits for one test (TEXTGEN_ACTIVATION_BITS 16 or 8), set
    back to the default after it."""
    with activation_digits(request.param):
        yield request.param


def reference(x: torch.Tensor, weight: torch.Tensor, digits: int = 2) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded in blocks of 32 to two int8
    digits, s * (q + f / 256) with s = max |x| / 127 (ties to even, f at most 127), or to one,
    s * q, times the weights the packed layout stands for."""
    rows, columns = x.shape
    blocks = x.double().reshape(rows, -1, INT4_GROUP)
    largest = blocks.abs().amax(-1, keepdim=True)
    scale = largest / 127
    scaled = torch.where(largest > 0, blocks / scale, torch.zeros(()))
    first = torch.round(scaled)
    second = torch.round((scaled - first) * 256).clamp(max=127) if digits == 2 else 0
    return ((first + second / 256) * scale).reshape(rows, columns) @ weight.double().t()


SHAPES = [(4, 64), (8, 576), (64, 640), (2304, 768), (12, 1536), (10, 128), (16, 96)]
# The product's error against unrounded activations, relative, by activation digits: measured
# 1.3e-5 to 2.4e-5 with two, 4.2e-3 to 1.04e-2 with one (the most with a block 1e4 x the rest).
ROUNDING = {2: 1e-4, 1: 2e-2}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_kernel_computes_the_rounded_product(
    bits: int, rows: int, columns: int, digits: int
) -> None:
    """Against the same rounding done in float64: the kernel's only other error is float32
    summation (relative 5e-7 measured); against the unrounded activations, the rounding to int8
    digits (ROUNDING). 4, 10 and 12 rows: packed with rows of zeros, which the answer leaves
    out; 96 columns: an odd number of blocks."""
    torch.manual_seed(rows + columns + bits)
    weight = torch.randn(rows, columns) * 0.02
    packed = blockwise.pack(weight, bits)
    stands_for = blockwise.unpack(packed, rows)
    x = torch.randn(9, columns) * 3
    x[2] = 0  # an all-zero row: scale 0, no division by it
    x[3, :INT4_GROUP] *= 1e4  # one block far larger than the rest
    got = blockwise.matmul(x, packed, rows).double()
    assert got.shape == (9, rows)
    want = reference(x, stands_for, digits)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    exact = x.double() @ stands_for.double().t()
    error = float((got - exact).norm() / exact.norm())
    assert error < ROUNDING[digits]
    assert torch.equal(got[2], torch.zeros(rows, dtype=torch.float64))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_rows_result_does_not_depend_on_the_batch(bits: int, digits: int) -> None:
    """Bit-equal alone, in a batch of 9, and in a batch of 256 (a prefill chunk's size, where
    the activations are rounded in parallel). 104 output rows: 13 groups of 8, which whole
    tiles of activation rows take two at a time with VNNI (the last alone), and one row takes
    one at a time."""
    torch.manual_seed(0)
    weight = torch.randn(104, 640) * 0.05
    packed = blockwise.pack(weight, bits)
    x = torch.randn(256, 640)
    batch = blockwise.matmul(x, packed, 104)
    nine = blockwise.matmul(x[:9], packed, 104)
    for row in range(9):
        alone = blockwise.matmul(x[row : row + 1], packed, 104)[0]
        assert torch.equal(alone, batch[row])
        assert torch.equal(alone, nine[row])


PLAIN_AVX2 = """
import sys
from pathlib import Path
from unittest import mock
import torch
from textgen.models import blockwise
with mock.patch.object(blockwise, "machine_options", lambda: []):
    blockwise.load(Path(sys.argv[1]))
x, packed, rows, digits = torch.load(sys.argv[2])
blockwise.set_activation_digits(digits)
torch.save(blockwise.matmul(x, packed, rows), sys.argv[3])
"""


@pytest.mark.parametrize("bits", [4, 8])
def test_the_avx2_build_gives_the_same_bits(bits: int, digits: int, tmp_path: Path) -> None:
    """The kernels built without AVX-512 (vpmaddubsw's 16-bit sums where VNNI has vpdpbusd, 3
    or 2 activation rows a tile where it has 4, one group of 8 output rows a tile where it has
    two) give the same bits as this process's build: the
    integer dot products are exact and the float operations the same. Run on a CPU with
    AVX-512 VNNI this compares two different builds; without, the AVX2 build with itself."""
    torch.manual_seed(bits)
    weight = torch.randn(44, 1536) * 0.05  # 5 groups of 8 rows, the last partly padding
    weight[:, :32] *= 40  # a block of large codes: Q8's 8-bit codes reach 255
    packed = blockwise.pack(weight, bits)
    x = torch.randn(11, 1536) * 2
    torch.save((x, packed, 44, digits), tmp_path / "inputs.pt")
    subprocess.run(
        [sys.executable, "-c", PLAIN_AVX2, str(tmp_path / "cache"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")],
        check=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    plain = torch.load(tmp_path / "out.pt")
    assert torch.equal(plain, blockwise.matmul(x, packed, 44))
    plain_build = next((tmp_path / "cache" / "kernels").glob("textgen_blocks-*.so"))
    this_build = blockwise.load(tmp_path)  # the process's, loaded by the module's fixture
    assert (plain_build.name != this_build.name) == bool(blockwise.machine_options())


def test_q4_layout_holds_the_int4_rounding() -> None:
    """The Q4 layout keeps int4_groups' codes; scales and minimums rounded to float16."""
    torch.manual_seed(1)
    weight = torch.randn(8, 576)
    codes, scale, low = blockwise.int4_groups(weight)
    half = scale.half().float(), low.half().float()
    expected = (codes * half[0][..., None] + half[1][..., None]).reshape(weight.shape)
    packed = blockwise.pack(weight, 4)
    assert torch.equal(blockwise.unpack(packed, 8), expected)
    assert packed.nbytes == weight.numel() * 5 // 8  # 4 bits and 2 float16 per 32: no padding


def test_q8_layout_holds_q8_0s_rounding() -> None:
    """Q8 keeps 8-bit codes against a float16 scale of max |w| / 127 per block of 32 (as GGUF's
    Q8_0): weights that are such codes already come back exactly; a block of zeros, or too
    small for float16's scales, stays zeros."""
    torch.manual_seed(2)
    codes = torch.randint(-127, 128, (6, 128)).float()
    codes[:, ::32] = 127  # each block's largest code, so that its scale is the one chosen
    scale = (torch.rand(6, 4) * 0.01 + 1e-3).half().float()
    weight = (codes.reshape(6, 4, 32) * scale[..., None]).reshape(6, 128)
    weight[5, 32:64] = 0
    weight[5, 64:96] = 1e-9
    packed = blockwise.pack(weight, 8)
    assert packed.shape == (1, 4, blockwise.BLOCK_BYTES[8])  # 6 rows padded to 8
    unpacked = blockwise.unpack(packed, 6)
    expected = weight.clone()
    expected[5, 64:96] = 0
    assert torch.equal(unpacked, expected)
    assert packed.nbytes == 8 * 128 + 8 * 4 * 2  # a byte a weight and a float16 per 32


def test_shapes_that_do_not_match_are_refused() -> None:
    for bits in (4, 8):
        packed = blockwise.pack(torch.randn(8, 128), bits)
        with pytest.raises(RuntimeError, match="do not match activations of 192"):
            blockwise.matmul(torch.randn(2, 192), packed, 8)
        with pytest.raises(RuntimeError, match="packed weights"):
            blockwise.matmul(torch.randn(2, 128), packed[0], 8)
        with pytest.raises(RuntimeError, match="12 output rows do not match"):
            blockwise.matmul(torch.randn(2, 128), packed, 12)
    assert not BlockLinear.fits(torch.nn.Linear(96, 12))  # joined rows not a multiple of 8
    assert BlockLinear.fits(torch.nn.Linear(96, 12), alone=True)
    assert BlockLinear.fits(torch.nn.Linear(96, 16))
    assert not BlockLinear.fits(torch.nn.Linear(80, 8))  # columns not whole blocks


FORMATS = [("int4", True), ("int4", False), ("int8", True)]


@pytest.fixture(scope="module", params=FORMATS, ids=["q4", "pytorch-int4", "q8"])
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LoadedModel, Path]]:
    """A tiny Llama compiled in int4 (its output layer int8) or int8, in textgen's kernels or
    (as on CPUs they cannot run on, such as ARM) PyTorch's."""
    dtype, textgens = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "blocks_preferred", lambda: textgens)
        source = save_tiny_llama(tmp_path_factory.mktemp("blocks") / "tiny", blocks=True)
        cache = tmp_path_factory.mktemp("blocks-cache")
        loaded = load_model(make_spec(str(source), dtype=dtype), ModelCache(cache), compiled=True)
        yield loaded, cache


def test_the_compiled_decoder_calls_the_kernels(tiny: tuple[LoadedModel, Path]) -> None:
    loaded, cache = tiny
    dtype = loaded.spec.dtype
    assert loaded.program is not None and compiled.supports(loaded.model, dtype)
    projections = compiled.program_class(loaded.model).projections(loaded.model)
    textgens = cpu.blocks_preferred()  # as the fixture set it
    pytorchs = Int4Linear if dtype == "int4" else Int8Linear
    assert all(type(linear) is (BlockLinear if textgens else pytorchs) for linear in projections)
    output = loaded.model.lm_head
    assert type(output) is (BlockLinear if textgens else Int8Linear)
    bits = 4 if dtype == "int4" else 8
    assert not textgens or (projections[0].bits, output.bits) == (bits, 8)
    (package,) = (cache / "compiled").glob(f"*-{dtype}.pt2")
    with zipfile.ZipFile(package) as archive:
        (library,) = [name for name in archive.namelist() if name.endswith(".so")]
        code = archive.read(library)
    # Direct calls of the kernels the layers hold.
    assert (b"aoti_torch_cpu_q4_mm" in code) == (textgens and bits == 4)
    assert (b"aoti_torch_cpu_q8_mm" in code) == textgens
    assert (b"aoti_torch_cpu_attend" in code) == textgens  # kernels/attention.cpp
    # whose KV cache is float16 (the buffers the engine makes for it: test_compiled.py)
    cache_dtype = torch.float16 if textgens else torch.float32
    assert loaded.program.cache_dtype == compiled.build_program(loaded.model).cache_dtype
    assert loaded.program.cache_dtype == cache_dtype
    assert_close_to_eager(loaded.model, loaded.program)


def test_served_through_http_alone_and_three_at_once(
    tiny: tuple[LoadedModel, Path], model_dirs: dict[str, Path]
) -> None:
    loaded, cache = tiny
    dtype = loaded.spec.dtype
    config = tiny_config(model_dirs, cache, DRAFT_TOKENS=0)
    config["MODELS"] = [{"name": "blocks", "source": str(loaded.prepared.path), "dtype": dtype}]
    app = create_app(config)
    model = app.test_client().get("/models").get_json()["models"][0]
    assert (model["dtype"], model["compiled"]) == (dtype, True)
    bodies = [
        {"prompt": prompt, "max_new_tokens": 12, "ignore_eos": True, "strategy": "greedy"}
        for prompt in PROMPTS
    ]
    alone = [text(post(app, body)) for body in bodies]
    assert alone == [step_by_step(loaded, prompt, 12) for prompt in PROMPTS]
    assert [text(response) for response in concurrently(app, bodies)] == alone


def first_logprob(loaded: LoadedModel, prompt: str, digits: int) -> float:
    """The log-probability of the greedy first token after ``prompt``, computed in this process
    with ``digits`` activation digits."""
    forward = CompiledForward(loaded.model, loaded.program)
    ids = torch.tensor([loaded.tokenizer.encode(prompt)])
    positions = torch.arange(ids.shape[1])[None]
    with activation_digits(digits), torch.inference_mode():
        logits = forward(ids, positions, torch.ones_like(ids), BatchCache())
    return float(torch.log_softmax(logits.double().reshape(-1, logits.shape[-1])[-1], -1).max())


@pytest.fixture
def two_digits_after() -> Iterator[None]:
    """The process's default activation digits back after a test that creates apps with 8 bits
    (which set one digit for the whole process), should it fail half-way."""
    yield
    blockwise.set_activation_digits(2)


@pytest.mark.usefixtures("two_digits_after")
def test_eight_bit_activations_through_http(
    tiny: tuple[LoadedModel, Path], model_dirs: dict[str, Path]
) -> None:
    """TEXTGEN_ACTIVATION_BITS=8: the process's kernels take one activation digit. The first
    token's logprob is the one-digit forward's, not the two-digit one's (in textgen's kernels;
    PyTorch's have no such setting and give the same either way); greedy text alone and three
    at once is the one-digit step-by-step text; a later app with the default sets two again."""
    loaded, cache = tiny
    textgens = cpu.blocks_preferred()  # as the fixture set it
    dtype = loaded.spec.dtype
    config = tiny_config(model_dirs, cache, DRAFT_TOKENS=0, ACTIVATION_BITS=8)
    config["MODELS"] = [{"name": "blocks", "source": str(loaded.prepared.path), "dtype": dtype}]
    one_digit, two_digits = (first_logprob(loaded, PROMPTS[0], digits) for digits in (1, 2))
    assert (one_digit != two_digits) == textgens
    with activation_digits(1):
        expected = [step_by_step(loaded, prompt, 12) for prompt in PROMPTS]
    app = create_app(config)  # which sets one digit for the process
    client = app.test_client()
    body = {"model": "blocks", "prompt": PROMPTS[0], "max_tokens": 1, "logprobs": 1}
    reply = client.post("/v1/completions", json={**body, "temperature": 0})
    assert reply.status_code == 200, reply.get_json()
    (served,) = reply.get_json()["choices"][0]["logprobs"]["token_logprobs"]
    assert served == pytest.approx(one_digit, abs=1e-5)
    bodies = [
        {"prompt": prompt, "max_new_tokens": 12, "ignore_eos": True, "strategy": "greedy"}
        for prompt in PROMPTS
    ]
    alone = [text(post(app, body)) for body in bodies]
    assert alone == expected
    assert [text(response) for response in concurrently(app, bodies)] == alone
    with pytest.raises(ConfigError, match="TEXTGEN_ACTIVATION_BITS"):
        create_app({**config, "ACTIVATION_BITS": 12})
    default = create_app({**config, "ACTIVATION_BITS": 16}).test_client()
    reply = default.post("/v1/completions", json={**body, "temperature": 0})
    (served,) = reply.get_json()["choices"][0]["logprobs"]["token_logprobs"]
    assert served == pytest.approx(two_digits, abs=1e-5)


# Run in a fresh process (the kernels load once per process): a model served in int8 and
# int4 by a process whose compiler cannot build the kernels.
UNBUILDABLE = """
import json, sys
from textgen import create_app
from textgen.models import quantize
models = [{"name": d, "source": sys.argv[1], "dtype": d} for d in ("int8", "int4")]
app = create_app({"MODELS": models, "MODEL_CACHE": sys.argv[2], "LOAD_MODE": "sync",
                  "COMPILE": False, "TORCH_THREADS": 1})
registry = app.extensions["textgen.registry"]
out = {}
for name in ("int8", "int4"):
    body = {"model": name, "prompt": "Hello", "max_new_tokens": 4, "ignore_eos": True}
    answer = app.test_client().post("/generate", json=body)
    kinds = {type(m).__name__ for m in registry.engine(name).runner.loaded.model.modules()}
    out[name] = [answer.status_code, sorted(k for k in kinds if k.endswith("Linear"))]
print(json.dumps(out))
"""


def test_a_compiler_that_cannot_build_the_kernels_leaves_pytorchs(tmp_path: Path) -> None:
    """The kernels are C++ built at first use; where the compiler fails on them, int8 and int4
    still serve, in PyTorch's kernels, instead of the model being unavailable."""
    compiler = tmp_path / "c++"
    compiler.write_text(
        '#!/bin/sh\ncase "$*" in *blocks.cpp*) echo "no AVX2 here" >&2; exit 1;; esac\n'
        'exec c++ "$@"\n'
    )
    compiler.chmod(0o755)
    source = save_tiny_llama(tmp_path / "tiny", blocks=True)
    env = {**os.environ, "CXX": str(compiler)}
    done = subprocess.run(
        [sys.executable, "-c", UNBUILDABLE, str(source), str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "textgen's kernels could not be built" in done.stderr
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["int8"] == [200, ["Int8Linear"]]
    assert served["int4"] == [200, ["Int4Linear", "Int8Linear"]]
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))
