"""ExpertVersion: one resident, kernel-ready version of one expert, and how a version is laid into a pool slot.

A version is data: two kernel callables (quant.kernels) for its gate_up and down matrices. Its tensors either
own their memory (static maps published by `Engine.apply`) or are views into one fixed-size slot of a pool
arena (the dynamic runtime): `slot_layout` lists a version's tensors at 64-byte aligned offsets, `place` copies
them into a slot and returns the same kernels rebuilt on views of that slot. So a transition allocates nothing
resident: the arenas are the only expert memory. Nothing here knows which precision an expert should have.
"""
from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass

import torch

from dynaexq.quant import kernels
from dynaexq.quant.precision import Precision
from dynaexq.store import layout

ALIGN = 64  # bytes: every tensor of a slot starts on a cache line (and any dtype's alignment)


@dataclass(frozen=True)
class ExpertVersion:
    precision: Precision
    gate_up: object  # callable x [T, H] -> [T, 2I] (quant.kernels, bias included where the model has one)
    down: object  # callable h [T, I] -> [T, H]
    tensor_data_names = ("gate_up", "down")
    number: int = 0  # version number, unique per runtime (0: published outside the runtime)
    slot: tuple | None = None  # (pool key, slot index) whose bytes the tensors view; None: owns its memory

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def make_version(weights: dict, backend: str, dtype: torch.dtype, device=None) -> ExpertVersion:
    """Store tensors of one expert -> a kernel-ready ExpertVersion owning its memory on `device` (the model's;
    biases in the model dtype)."""
    bias = {b: weights[b].to(dtype) for b in layout.BIASES if b in weights}
    return ExpertVersion(weights["gate_up"].precision,
                         kernels.prepare(weights["gate_up"], backend, bias.get("gate_up_bias"), device),
                         kernels.prepare(weights["down"], backend, bias.get("down_bias"), device))


def _names(obj) -> tuple:
    """The fields of obj holding its resident tensors: a kernel declares them (`tensor_data_names`, as torchao's
    tensor subclasses do); any other dataclass (a version, a QuantizedWeight) is walked field by field."""
    return getattr(obj, "tensor_data_names", None) or tuple(f.name for f in dataclasses.fields(obj))


def _tensors(obj, path=()) -> list:
    """[(field path, tensor)] of every resident tensor reachable from obj, in declaration order."""
    out = []
    for name in _names(obj):
        v = getattr(obj, name)
        if isinstance(v, torch.Tensor):
            out.append(((*path, name), v))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += _tensors(v, (*path, name))
    return out


def _rebuild(obj, new: dict, path=()):
    changes = {}
    for name in _names(obj):
        v = getattr(obj, name)
        if isinstance(v, torch.Tensor):
            changes[name] = new[(*path, name)]
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            changes[name] = _rebuild(v, new, (*path, name))
    return dataclasses.replace(obj, **changes)


def slot_layout(version: ExpertVersion) -> tuple[list, int]:
    """-> ([(path, byte offset, dtype, shape)], slot bytes needed): the measured packed size of a version."""
    out, off = [], 0
    for path, t in _tensors(version):
        out.append((path, off, t.dtype, tuple(t.shape)))
        off += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return out, off


def _copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool) -> None:
    """dst <- src. Between CPU tensors one memmove on the calling thread (the GIL released): a transition worker
    must not start an OpenMP team on the forward pass's cores, and limiting its own threads with
    torch.set_num_threads would set the default of every thread started after it (the server's decode thread)."""
    if dst.device.type == src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src, non_blocking=non_blocking)


def place(version: ExpertVersion, slot: torch.Tensor, number: int, key, non_blocking: bool = False) -> ExpertVersion:
    """Copy a version's tensors into `slot` (uint8 [slot bytes]) -> the same version viewing the slot."""
    entries, need = slot_layout(version)
    assert need <= slot.numel(), (need, slot.numel())
    src = dict(_tensors(version))
    views = {}
    for path, off, dtype, shape in entries:
        n = src[path].numel() * src[path].element_size()
        view = slot[off:off + n].view(dtype).view(shape)
        _copy(view, src[path], non_blocking)
        views[path] = view
    placed = dataclasses.replace(_rebuild(version, views), number=number, slot=key)
    lo, hi = slot.data_ptr(), slot.data_ptr() + slot.numel()
    for path, t in _tensors(placed):  # every tensor the kernels read lies in the slot: nothing owns memory
        assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi, (path, key)
    return placed
