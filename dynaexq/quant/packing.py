"""Bit packing of integer codes into bytes: the storage format of the expert store.

int8: one code per byte; int6: four codes in three bytes (a 24-bit little-endian word, code i at bits
6i..6i+5); int4: two per byte (low nibble first); int3: eight codes in three bytes (a 24-bit little-endian
word, code i at bits 3i..3i+2); int2: four per byte (lowest bits first).
Codes are packed in row-major order of the [N, K] weight; the code count is padded up to a
whole word with zeros (at most 7 codes), so `packed_nbytes` is the exact stored size.
"""
from __future__ import annotations

import torch

_CODES_PER_WORD = {8: 1, 6: 4, 4: 2, 3: 8, 2: 4}
_BYTES_PER_WORD = {8: 1, 6: 3, 4: 1, 3: 3, 2: 1}


def packed_nbytes(numel: int, bits: int) -> int:
    words = -(-numel // _CODES_PER_WORD[bits])
    return words * _BYTES_PER_WORD[bits]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer tensor of any shape with values in [0, 2**bits) -> flat uint8 tensor."""
    if bits in (8, 4, 2):  # whole codes per byte (low bits first): shift and or in uint8, as `unpack` reads them
        per = 8 // bits
        flat = codes.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % per
        v = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per) if pad else flat.view(-1, per)
        out = v[:, 0].clone()
        for i in range(1, per):
            out |= v[:, i] << (i * bits)
        return out
    per = _CODES_PER_WORD[bits]
    flat = codes.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(-1, per)  # [W, codes per word]
    shifts = torch.arange(per, dtype=torch.int32) * bits
    word = (words << shifts).sum(dim=1, dtype=torch.int32)  # fields are disjoint: sum == or
    nbytes = _BYTES_PER_WORD[bits]
    out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(nbytes)], dim=1)  # [W, bytes per word]
    return out.to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: flat uint8 -> flat int32 codes (first `numel`)."""
    if bits in (8, 4, 2):  # whole codes per byte: shift and mask in uint8, ~4x faster than int32 words
        fields = [(packed >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)]
        return torch.stack(fields, dim=1).reshape(-1)[:numel].to(torch.int32)
    per = _CODES_PER_WORD[bits]
    nbytes = _BYTES_PER_WORD[bits]
    b = packed.to(torch.int32).view(-1, nbytes)
    word = b[:, 0]
    for i in range(1, nbytes):
        word = word | (b[:, i] << (8 * i))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (word[:, None] >> shifts) & ((1 << bits) - 1)  # [W, codes per word]
    return codes.reshape(-1)[:numel]
