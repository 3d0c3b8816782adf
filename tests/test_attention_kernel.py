"""textgen's batch-invariant attention kernel (kernels/attention.cpp, blockwise.attend), which
compiled decoders call where textgen's kernels are built: its arithmetic and its invariance.
Through HTTP it is tested with the compiled decoders (test_blockwise.py, test_compiled.py,
test_reproducible.py)."""

from __future__ import annotations

import pytest
import torch

# The library built once for the module (an autouse fixture, imported to be used here too).
from tests.test_blockwise import NEEDS_KERNELS, kernel  # noqa: F401
from textgen.models import blockwise, cpu
from textgen.models.compiled import kernel_attention

pytestmark = NEEDS_KERNELS


def softmax_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention in float64 by its definition: [rows, tokens, heads x dim]."""
    rows, heads, tokens, dim = query.shape
    columns, group = mask.shape[-1], heads // keys.shape[1]
    k = keys[:, :, :columns].repeat_interleave(group, 1).double()
    v = values[:, :, :columns].repeat_interleave(group, 1).double()
    scores = (query.double() @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(rows, tokens, heads * dim)


# (rows, heads, kv heads, tokens, dim, buffer capacity, columns): GPT-2's heads (one query head
# a key/value head), the embedded model's (3), phi-2's dimension 80, a dimension the kernel has
# no specialised loop for (24).
ATTENTION = [(3, 12, 12, 1, 64, 40, 33), (2, 9, 3, 5, 64, 100, 70), (1, 4, 4, 7, 80, 20, 19),
             (2, 4, 2, 3, 24, 16, 9)]  # fmt: skip


@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "heads", "kv", "tokens", "dim", "capacity", "columns"), ATTENTION)
def test_attention_kernel_computes_softmax_attention(
    rows: int,
    heads: int,
    kv: int,
    tokens: int,
    dim: int,
    capacity: int,
    columns: int,
    cache: torch.dtype,
) -> None:
    """Over the first ``columns`` of larger buffers of float32 or float16 (the compiled
    decoders'), with a random mask; a query row that sees no column gets zeros. The reference
    takes the buffers' own values: the kernel's only error is float32 arithmetic."""
    torch.manual_seed(rows * heads + dim)
    query = torch.randn(rows, heads, tokens, dim)
    keys, values = torch.randn(2, rows, kv, capacity, dim).to(cache)
    mask = torch.rand(rows, 1, tokens, columns) > 0.3
    mask[:, :, :, -1] = True
    mask[0, 0, 0] = False
    got = blockwise.attend(query, keys, values, mask, 0.125)
    assert got.shape == (rows, tokens, heads * dim)
    assert torch.equal(got[0, 0], torch.zeros(heads * dim))
    want = softmax_attention(query, keys, values, mask, 0.125)
    want[0, 0] = 0  # softmax over no column: NaN by the definition, zeros by the kernel
    assert float((got.double() - want).abs().max()) < 2e-6


@pytest.mark.parametrize("cache", [torch.float32, torch.float16])
def test_attention_kernel_is_batch_invariant(cache: torch.dtype) -> None:
    """A query row's result is the same bits alone, among other rows and tokens, and with
    hidden (padding) columns before its own, as in a batch whose rows are right-aligned."""
    torch.manual_seed(3)
    heads, kv, dim, columns = 9, 3, 64, 50
    query = torch.randn(4, heads, 6, dim)
    keys, values = torch.randn(2, 4, kv, 64, dim).to(cache)
    mask = torch.ones(4, 1, 6, columns, dtype=torch.bool)
    batch = blockwise.attend(query, keys, values, mask, 0.125)
    # The query as compiled decoders pass it: a view of the [rows, tokens, heads, dim]
    # projection, read in place.
    view = query.transpose(1, 2).contiguous().transpose(1, 2)
    assert not view.is_contiguous()
    assert torch.equal(blockwise.attend(view, keys, values, mask, 0.125), batch)
    alone = blockwise.attend(query[2:3, :, 4:5], keys[2:3], values[2:3], mask[2:3, :, 4:5], 0.125)
    assert torch.equal(alone[0, 0], batch[2, 4])
    # The same row behind 13 hidden columns of other content, in a buffer of another size.
    shifted_keys, shifted_values = torch.randn(2, 1, kv, 80, dim).to(cache)
    shifted_keys[:, :, 13 : 13 + columns] = keys[2, :, :columns]
    shifted_values[:, :, 13 : 13 + columns] = values[2, :, :columns]
    shifted_mask = torch.ones(1, 1, 1, 13 + columns, dtype=torch.bool)
    shifted_mask[..., :13] = False
    shifted = blockwise.attend(
        query[2:3, :, 4:5], shifted_keys, shifted_values, shifted_mask, 0.125
    )
    assert torch.equal(shifted[0, 0], batch[2, 4])


def test_keys_and_values_of_two_types_are_refused() -> None:
    query = torch.randn(1, 2, 1, 8)
    keys = torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        blockwise.attend(query, keys, keys.half(), mask, 1.0)
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        blockwise.attend(query, keys.double(), keys.double(), mask, 1.0)


def test_which_decoders_take_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch-invariant decoders whose heads the kernel takes, where textgen's kernels run."""
    monkeypatch.setattr(cpu, "blocks_preferred", lambda: True)
    assert kernel_attention(64, deterministic=True) and kernel_attention(80, deterministic=True)
    assert not kernel_attention(64, deterministic=False)  # PyTorch's fused attention
    assert not kernel_attention(12, deterministic=True) and not kernel_attention(512, True)
    monkeypatch.setattr(cpu, "blocks_preferred", lambda: False)
    assert not kernel_attention(64, deterministic=True)
