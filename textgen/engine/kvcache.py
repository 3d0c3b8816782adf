"""A KV cache whose rows (sequences) can join and leave a running batch between decode steps."""

from __future__ import annotations

from typing import Any, cast

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Spare columns allocated beyond what is needed, so most steps write in place.
HEADROOM = 64
# A full buffer grows by this factor at least: each growth copies every column, so growing by a
# fixed HEADROOM made a long prompt's prefill copy its whole cache every few chunks.
GROWTH = 1.5


def grown(buffer: torch.Tensor | None, columns: int) -> int:
    """The capacity a buffer that must hold ``columns`` grows to."""
    current = 0 if buffer is None else buffer.shape[-2]
    return max(columns + HEADROOM, int(current * GROWTH))


class SlotLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer, written in place.

    transformers' DynamicLayer concatenates the whole cache on every step (a full copy per token);
    here a step writes one column and only growth past the buffer copies.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self.reserve(grown(self.key_buffer, end), key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self.current()

    def reserve(self, capacity: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Grow the buffers to ``capacity`` columns, keeping what they hold."""
        keys = key_like.new_zeros(*key_like.shape[:2], capacity, key_like.shape[-1])
        values = value_like.new_zeros(*value_like.shape[:2], capacity, value_like.shape[-1])
        if self.key_buffer is not None and self.value_buffer is not None:
            keys[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            values[:, :, : self.length] = self.value_buffer[:, :, : self.length]
        self.key_buffer, self.value_buffer = keys, values

    # transformers' layers hold ``keys`` and ``values``; here they are views of the buffers'
    # filled part (``length`` columns), made when read: a compiled step sets every layer's
    # length, and making 60 views each step took 0.12 ms of a 7 ms one-row step.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.length]

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        if keys is not None:  # only transformers' initial None is expected
            raise TypeError("a SlotLayer's keys are set through its buffers")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.length]

    @values.setter
    def values(self, values: torch.Tensor | None) -> None:
        if values is not None:
            raise TypeError("a SlotLayer's values are set through its buffers")

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of the keys and values (views into the buffers)."""
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None and self.value_buffer is not None:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]

    def drop_leading(self, columns: int) -> None:
        """Forget the first ``columns`` positions (padding no row attends to any more)."""
        if columns and self.key_buffer is not None and self.value_buffer is not None:
            self.key_buffer = self.key_buffer[:, :, columns:]
            self.value_buffer = self.value_buffer[:, :, columns:]
            self.length -= columns


class BatchCache(Cache):
    """The running batch's cache: rows are sequences, all aligned on the right (left padding)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=SlotLayer)

    @property
    def slots(self) -> list[SlotLayer]:
        """The layers, which are all SlotLayers (this cache creates no other kind)."""
        return cast(list[SlotLayer], self.layers)

    @property
    def length(self) -> int:
        return self.slots[0].get_seq_length() if self.layers else 0

    def make_room(
        self,
        layers: int,
        rows: int,
        heads: int,
        dim: int,
        columns: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Contiguous ``dtype`` buffers of at least ``columns`` columns in each of ``layers``
        layers, for compiled code that writes them directly rather than through ``update`` (it
        is built for contiguous inputs of one type; dropping leading columns leaves strided
        views)."""
        like = torch.empty(rows, heads, 0, dim, dtype=dtype)
        while len(self.layers) < layers:
            slot = SlotLayer()
            slot.lazy_initialization(like, like)
            self.layers.append(slot)
        for slot in self.slots:
            buffer = slot.key_buffer
            if buffer is None or buffer.shape[-2] < columns:
                slot.reserve(grown(buffer, columns), like, like)
            elif not buffer.is_contiguous() or buffer.dtype != dtype:
                slot.reserve(buffer.shape[-2], like, like)

    def truncate(self, columns: int) -> None:
        """Keep the first ``columns`` columns (the buffers stay; later writes go after them)."""
        for slot in self.slots:
            slot.length = columns

    @classmethod
    def right_aligned(
        cls,
        kept: list[list[tuple[torch.Tensor, torch.Tensor]]],
        lengths: list[int],
        columns: int,
        room: int,
    ) -> BatchCache:
        """A cache of one row per entry of ``kept`` (per layer: keys and values [1, heads, n,
        dim]), its first ``lengths`` columns ending at column ``columns``; space for ``room``
        more columns."""
        cache = cls()
        for layer in range(len(kept[0])):
            like_keys, like_values = kept[0][layer]
            shape = (len(kept), like_keys.shape[1], columns + room + HEADROOM, like_keys.shape[-1])
            keys, values = like_keys.new_zeros(shape), like_values.new_zeros(shape)
            for row, (layers, length) in enumerate(zip(kept, lengths, strict=True)):
                keys[row, :, columns - length : columns] = layers[layer][0][0, :, :length]
                values[row, :, columns - length : columns] = layers[layer][1][0, :, :length]
            slot = SlotLayer()
            slot.lazy_initialization(keys, values)
            slot.key_buffer, slot.value_buffer = keys, values
            slot.length = columns
            cache.layers.append(slot)
        return cache

    def copy_row(self, row: int, columns: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of one row's ``columns`` (indices, in order), per layer: [1, heads, n, dim]."""
        return [
            (
                keys[row : row + 1].index_select(2, columns),
                values[row : row + 1].index_select(2, columns),
            )
            for keys, values in (slot.current() for slot in self.slots)
        ]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (finished or cancelled sequences leave)."""
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.slots:
            layer.batch_select_indices(index)

    def drop_leading(self, columns: int) -> None:
        for layer in self.slots:
            layer.drop_leading(columns)

    def extend(self, other: BatchCache) -> None:
        """Append ``other``'s rows below ours, left-padding whichever is shorter."""
        if not self.layers:
            self.layers = other.layers
            return
        length = max(self.length, other.length)
        for number, (mine, theirs) in enumerate(zip(self.slots, other.slots, strict=True)):
            (my_keys, my_values), (their_keys, their_values) = mine.current(), theirs.current()
            merged = SlotLayer()
            merged.lazy_initialization(my_keys, my_values)
            merged.key_buffer = stack_right_aligned(my_keys, their_keys, length + HEADROOM)
            merged.value_buffer = stack_right_aligned(my_values, their_values, length + HEADROOM)
            merged.length = length
            self.layers[number] = merged


def stack_right_aligned(top: torch.Tensor, bottom: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B1+B2, H, capacity, D] with each part's columns ending at the same position."""
    length = max(top.shape[-2], bottom.shape[-2])
    out = top.new_zeros(top.shape[0] + bottom.shape[0], top.shape[1], capacity, top.shape[-1])
    out[: top.shape[0], :, length - top.shape[-2] : length] = top
    out[top.shape[0] :, :, length - bottom.shape[-2] : length] = bottom
    return out


def merge_masks(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Stack two attention masks, left-padding the narrower one (as the cache rows are)."""
    width = max(top.shape[1], bottom.shape[1])
    return torch.cat(
        [
            torch.nn.functional.pad(top, (width - top.shape[1], 0)),
            torch.nn.functional.pad(bottom, (width - bottom.shape[1], 0)),
        ]
    )
