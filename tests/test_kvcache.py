"""The batch KV cache: rows join right-aligned, leave, and dead columns are dropped."""

from __future__ import annotations

import pytest
import torch

from textgen.engine.kvcache import BatchCache, SlotLayer, stack_right_aligned


def filled(rows: int, length: int, start: float) -> BatchCache:
    cache = BatchCache()
    values = torch.arange(rows * length, dtype=torch.float32).reshape(rows, 1, length, 1) + start
    cache.update(values, values.clone(), 0)
    return cache


def test_update_writes_in_place_and_grows() -> None:
    layer = SlotLayer()
    keys, _ = layer.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    buffer = layer.key_buffer
    keys, _ = layer.update(torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 2.0))
    assert layer.key_buffer is buffer  # no copy for a step that fits
    assert keys.shape[-2] == 4 and keys[0, 0, -1, 0] == 2.0
    layer.update(torch.zeros(1, 1, 200, 2), torch.zeros(1, 1, 200, 2))
    assert layer.get_seq_length() == 204 and layer.current()[0][0, 0, 3, 0] == 2.0


def test_extend_right_aligns_rows() -> None:
    cache = filled(1, 2, 100)
    cache.extend(filled(2, 4, 0))
    keys = cache.slots[0].current()[0]
    assert keys.shape == (3, 1, 4, 1)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 100, 101]  # the shorter row is left-padded
    assert keys[2, 0, :, 0].tolist() == [4, 5, 6, 7]


def test_keep_rows_and_drop_leading() -> None:
    cache = filled(3, 4, 0)
    cache.keep_rows([0, 2])
    cache.drop_leading(1)
    keys = cache.slots[0].current()[0]
    assert keys[:, 0, :, 0].tolist() == [[1, 2, 3], [9, 10, 11]]
    assert cache.length == 3


def test_stack_right_aligned() -> None:
    out = stack_right_aligned(torch.ones(1, 1, 1, 1), torch.full((1, 1, 2, 1), 2.0), 5)
    assert out.shape == (2, 1, 5, 1)
    assert out[:, 0, :, 0].tolist() == [[0, 1, 0, 0, 0], [2, 2, 0, 0, 0]]


def test_make_room_gives_contiguous_buffers_that_keep_what_they_hold() -> None:
    cache = BatchCache()
    cache.make_room(layers=2, rows=3, heads=1, dim=2, columns=5)
    assert len(cache.slots) == 2 and cache.length == 0
    assert all(
        slot.key_buffer is not None and slot.key_buffer.shape == (3, 1, 5 + 64, 2)
        for slot in cache.slots
    )
    held = filled(2, 6, 0)
    held.drop_leading(2)  # a strided view of the buffer: compiled code wants contiguous ones
    assert held.slots[0].key_buffer is not None
    assert not held.slots[0].key_buffer.is_contiguous()
    before = held.slots[0].current()[0].clone()
    same = held.slots[0].key_buffer
    held.make_room(layers=1, rows=2, heads=1, dim=1, columns=5)
    after = held.slots[0].key_buffer
    assert after is not same and after.is_contiguous()
    assert torch.equal(held.slots[0].current()[0], before)  # the 4 filled columns kept
    held.make_room(layers=1, rows=2, heads=1, dim=1, columns=6)
    assert held.slots[0].key_buffer is after  # room enough: no copy


def test_a_layers_keys_and_values_follow_its_length() -> None:
    """transformers reads a layer's ``keys`` and ``values``: views of the filled columns, made
    when read, so a length set directly (as the compiled step does) is what they show."""
    layer = SlotLayer()
    assert layer.keys is None and layer.values is None
    layer.update(torch.ones(1, 1, 3, 2), torch.full((1, 1, 3, 2), 2.0))
    assert layer.keys is not None and layer.keys.shape[-2] == 3
    layer.length = 2
    assert layer.keys.shape[-2] == 2 and layer.values is not None
    assert layer.values.shape[-2] == 2 and float(layer.values.sum()) == 8.0
    assert layer.keys.data_ptr() == layer.key_buffer.data_ptr()  # a view, not a copy
    with pytest.raises(TypeError):
        layer.keys = torch.zeros(1, 1, 1, 2)  # written through the buffers only
