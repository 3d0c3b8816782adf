"""textgen's int4 x int8 kernel (textgen/models/q4.py, kernels/q4q8.cpp): its arithmetic, its
batch invariance, its layout, and a compiled decoder that calls it, served through HTTP.

The kernel is what int4 runs on x86-64 CPUs with AVX2, FMA and F16C but not AVX-512; the
compiled decoder's tests force it and PyTorch's int4 kernel in turn (``cpu.q4_preferred``), so
every machine that can run it checks both."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from tests.test_compiled import PROMPTS, assert_close_to_eager, step_by_step
from tests.test_engine import concurrently, post, text
from tests.tiny_models import save_tiny_llama
from textgen import create_app
from textgen.models import compiled, cpu, q4
from textgen.models.cache import ModelCache
from textgen.models.cpu import cpu_flags, q4_runnable
from textgen.models.loading import LoadedModel, load_model
from textgen.models.quantize import INT4_GROUP, Int4Linear, Q4Linear
from textgen.models.specs import make_spec

pytestmark = pytest.mark.skipif(
    not q4_runnable(set(cpu_flags().split())), reason="needs x86-64 with AVX2, FMA, F16C and c++"
)


@pytest.fixture(scope="module", autouse=True)
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return q4.load(tmp_path_factory.mktemp("kernel-cache"))


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64: activations rounded to int8 in blocks of 32 (scale
    max |x| / 127, ties to even), times the weights the packed layout stands for."""
    rows, columns = x.shape
    blocks = x.double().reshape(rows, -1, INT4_GROUP)
    largest = blocks.abs().amax(-1, keepdim=True)
    scale = largest / 127
    codes = torch.round(torch.where(largest > 0, blocks / scale, torch.zeros(()))).clamp(-127, 127)
    return (codes * scale).reshape(rows, columns) @ weight.double().t()


SHAPES = [(4, 64), (8, 576), (64, 640), (2304, 768), (12, 1536)]


@pytest.mark.parametrize(("rows", "columns"), SHAPES)
def test_kernel_computes_the_rounded_product(rows: int, columns: int) -> None:
    """Against the same rounding done in float64: the kernel's only other error is float32
    summation (relative 1e-6 measured); against the unrounded activations, the int8 rounding
    (5.3e-3 measured)."""
    torch.manual_seed(rows + columns)
    weight = torch.randn(rows, columns) * 0.02
    packed = q4.quantized(weight)
    stands_for = q4.dequantized(packed)
    x = torch.randn(9, columns) * 3
    x[2] = 0  # an all-zero row: scale 0, no division by it
    x[3, :INT4_GROUP] *= 1e4  # one block far larger than the rest
    got = q4.matmul(x, packed, columns).double()
    want = reference(x, stands_for)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    exact = x.double() @ stands_for.double().t()
    assert float((got - exact).norm() / exact.norm()) < 0.02
    assert torch.equal(got[2], torch.zeros(rows, dtype=torch.float64))


def test_a_rows_result_does_not_depend_on_the_batch() -> None:
    """Bit-equal alone, in a batch of 9, and in a batch of 256 (a prefill chunk's size, where
    the activations are rounded in parallel)."""
    torch.manual_seed(0)
    weight = torch.randn(96, 640) * 0.05
    packed = q4.quantized(weight)
    x = torch.randn(256, 640)
    batch = q4.matmul(x, packed, 640)
    nine = q4.matmul(x[:9], packed, 640)
    for row in range(9):
        alone = q4.matmul(x[row : row + 1], packed, 640)[0]
        assert torch.equal(alone, batch[row])
        assert torch.equal(alone, nine[row])


def test_layout_holds_the_int4_rounding() -> None:
    """The packed layout keeps int4_groups' codes; scales and minimums rounded to float16."""
    torch.manual_seed(1)
    weight = torch.randn(8, 576)
    codes, scale, low = q4.int4_groups(weight)
    half = scale.half().float(), low.half().float()
    expected = (codes * half[0][..., None] + half[1][..., None]).reshape(weight.shape)
    packed = q4.quantized(weight)
    assert torch.equal(q4.dequantized(packed), expected)
    assert packed.nbytes == weight.numel() * 5 // 8  # 4 bits and 2 float16 per 32: no padding


def test_shapes_that_do_not_match_are_refused() -> None:
    packed = q4.quantized(torch.randn(8, 128))
    with pytest.raises(RuntimeError, match="do not match"):
        q4.matmul(torch.randn(2, 192), packed, 128)
    with pytest.raises(RuntimeError, match="packed weights"):
        q4.matmul(torch.randn(2, 128), packed[0], 128)
    assert not Q4Linear.fits(torch.nn.Linear(96, 10))  # rows not a multiple of 4
    assert not Q4Linear.fits(torch.nn.Linear(96, 8))  # columns not whole pairs of blocks


@pytest.fixture(scope="module", params=[True, False], ids=["textgen-kernel", "pytorch-kernel"])
def tiny_int4(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LoadedModel, Path]]:
    """A tiny Llama in compiled int4, in textgen's kernel or (as on CPUs it cannot run on,
    such as ARM) PyTorch's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "q4_preferred", lambda flags=None: request.param)
        source = save_tiny_llama(tmp_path_factory.mktemp("int4-blocks") / "tiny", blocks=True)
        cache = tmp_path_factory.mktemp("int4-cache")
        loaded = load_model(make_spec(str(source), dtype="int4"), ModelCache(cache), compiled=True)
        yield loaded, cache


def test_the_compiled_decoder_calls_the_kernel(tiny_int4: tuple[LoadedModel, Path]) -> None:
    loaded, cache = tiny_int4
    assert loaded.program is not None and compiled.supports(loaded.model, "int4")
    projections = compiled.program_class(loaded.model).projections(loaded.model)
    textgens = cpu.q4_preferred()  # as the fixture set it
    kind = Q4Linear if textgens else Int4Linear
    assert all(type(linear) is kind for linear in projections)
    (package,) = (cache / "compiled").glob("*-int4.pt2")
    with zipfile.ZipFile(package) as archive:
        (library,) = [name for name in archive.namelist() if name.endswith(".so")]
        assert (b"aoti_torch_cpu_q4q8_mm" in archive.read(library)) == textgens  # a direct call
    assert_close_to_eager(loaded.model, loaded.program)


def test_served_through_http_alone_and_three_at_once(
    tiny_int4: tuple[LoadedModel, Path], model_dirs: dict[str, Path]
) -> None:
    loaded, cache = tiny_int4
    config = tiny_config(model_dirs, cache, DRAFT_TOKENS=0)
    config["MODELS"] = [{"name": "q4", "source": str(loaded.prepared.path), "dtype": "int4"}]
    app = create_app(config)
    model = app.test_client().get("/models").get_json()["models"][0]
    assert (model["dtype"], model["compiled"]) == ("int4", True)
    bodies = [
        {"prompt": prompt, "max_new_tokens": 12, "ignore_eos": True, "strategy": "greedy"}
        for prompt in PROMPTS
    ]
    alone = [text(post(app, body)) for body in bodies]
    assert alone == [step_by_step(loaded, prompt, 12) for prompt in PROMPTS]
    assert [text(response) for response in concurrently(app, bodies)] == alone
