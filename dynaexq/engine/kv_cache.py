"""SlotCache: a preallocated KV cache of row slots, behind transformers' `Cache` interface.

Keys and values live in one buffer per layer, [R rows, heads, capacity, head dim], allocated at the first write
(and grown by doubling the capacity when a row would pass it: a few times per run, never per step). Each row
belongs to one sequence and is right-padded: row r holds its tokens at positions [0, lens[r]). A forward runs on
a contiguous range of rows chosen by `select(start, n)`: a prefill chunk on the one row of the sequence being
prefilled, a decode step on the running rows [0, B). `update` writes the step's keys and values at each row's own
positions (one indexed store for a decode step: nothing is copied or concatenated) and returns views of the rows
up to the longest one; the decoder passes a [B, L] mask of each row's valid positions and each token's position.
After the forward the decoder calls `advance(n)`. A sequence that leaves empties its row (`clear`) and the decoder
moves the last running row into the hole (`move`: a copy of that one sequence's keys, not of the batch). The decode attention
(engine/attention.py) reads the rows in place with their lengths.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROW = 2  # capacity factor when a row outgrows the buffers


class _SlotLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner
        self.keys = self.values = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        o = self.owner
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(o.rows, key_states.shape[1], o.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(o.rows, value_states.shape[1], o.capacity, value_states.shape[-1])
        self.is_initialized = True

    def _fit(self) -> None:
        """Grow the buffers to the owner's capacity (after `SlotCache.reserve` raised it)."""
        cap = self.owner.capacity
        if self.keys.shape[2] < cap:
            for name in ("keys", "values"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, :old.shape[2]] = old
                setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._fit()
        o = self.owner
        start, n, q = o.start, o.n, key_states.shape[2]
        if q == 1:  # a decode step: row i's token at its own position lens[i], one indexed store per tensor
            self.keys[o.row_index, :, o.pos_index] = key_states[:, :, 0]
            self.values[o.row_index, :, o.pos_index] = value_states[:, :, 0]
        else:
            for i in range(n):
                p = o.lens[start + i]
                self.keys[start + i, :, p:p + q] = key_states[i]
                self.values[start + i, :, p:p + q] = value_states[i]
        end = o.kv_length(q)
        return self.keys[start:start + n, :, :end], self.values[start:start + n, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_length(query_length), 0

    def get_seq_length(self) -> int:
        o = self.owner
        return max(o.lens[o.start:o.start + o.n], default=0)

    def get_max_length(self) -> int:
        return self.owner.capacity

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class SlotCache(Cache):
    def __init__(self, config, rows: int, capacity: int = 256):
        layers = getattr(config, "num_hidden_layers")
        self.rows, self.capacity = rows, capacity
        self.lens = [0] * rows  # tokens held per row
        self.start, self.n = 0, 0  # the rows the next forward runs on
        self.row_index = self.pos_index = None  # decode: [n] rows and positions of the step's tokens
        super().__init__(layers=[_SlotLayer(self) for _ in range(layers)])

    @staticmethod
    def supports(config) -> bool:
        """Full attention in every layer (no sliding window, no linear-attention state)."""
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return types == {"full_attention"} and not getattr(config, "sliding_window", None)

    def select(self, start: int, n: int, query_length: int) -> None:
        """The next forward runs rows [start, start + n) with `query_length` new tokens each."""
        assert 0 <= start and start + n <= self.rows, (start, n, self.rows)
        self.start, self.n = start, n
        self.reserve(max(self.lens[start:start + n]) + query_length)
        if query_length == 1:
            self.row_index = torch.arange(start, start + n)
            self.pos_index = torch.tensor(self.lens[start:start + n])

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per row (doubling: rare reallocations, never one per step)."""
        while self.capacity < length:
            self.capacity *= GROW

    def decode_buffers(self, layer: int, key_states: torch.Tensor) -> tuple:
        """A decode step of the selected rows written by the caller (engine/attention.py's native block) instead of
        `update`: -> layer's key and value buffers [R, Hkv, C, D] (allocated and grown as `update` does), the
        step's cache rows and positions [n], and the views of the selected rows up to this step's length.
        key_states: [n, Hkv, D], the step's keys (their shape and dtype size the buffers)."""
        lay = self.layers[layer]
        if not lay.is_initialized:
            lay.lazy_initialization(key_states[:, :, None], key_states[:, :, None])
        lay._fit()
        rows, end = slice(self.start, self.start + self.n), self.kv_length(1)
        return lay.keys, lay.values, self.row_index, self.pos_index, lay.keys[rows, :, :end], lay.values[rows, :, :end]

    def kv_length(self, query_length: int) -> int:
        """Positions the selected rows span after this forward's `query_length` tokens are written."""
        return max(self.lens[self.start:self.start + self.n]) + query_length

    def advance(self, tokens: int) -> None:
        """The forward on the selected rows is done: each holds `tokens` more."""
        for r in range(self.start, self.start + self.n):
            self.lens[r] += tokens

    def mask(self) -> torch.Tensor:
        """[n, kv_length(1)] of a decode step: 1 where a row holds a token (its new one included)."""
        lens = torch.tensor(self.lens[self.start:self.start + self.n])
        return (torch.arange(int(lens.max()) + 1)[None] <= lens[:, None]).long()

    def lengths(self) -> torch.Tensor:
        """[n] tokens per selected row once this decode step's token is written (the attention's lengths)."""
        return torch.tensor(self.lens[self.start:self.start + self.n]) + 1

    def move(self, src: int, dst: int) -> None:
        """Row src's tokens into row dst (src is free afterwards)."""
        n = self.lens[src]
        for layer in self.layers:
            if layer.is_initialized and n:
                layer.keys[dst, :, :n] = layer.keys[src, :, :n]
                layer.values[dst, :, :n] = layer.values[src, :, :n]
        self.lens[dst], self.lens[src] = n, 0

    def clear(self, row: int) -> None:
        self.lens[row] = 0

    def buffers(self) -> list:
        """Every layer's key and value buffers (tests check they are not reallocated per step)."""
        return [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]
