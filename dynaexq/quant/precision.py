"""The precisions an expert can live at, and what each one means in bits and grouping.

Nothing here knows about tensors beyond dtypes: this is the vocabulary every other layer speaks.
"""
from __future__ import annotations

from enum import Enum

import torch

from dynaexq.errors import UserError


class Precision(str, Enum):
    FP32 = "fp32"  # reference precision: exact, used to hold the bank equal to transformers
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    INT6 = "int6"
    INT4 = "int4"
    INT3 = "int3"
    INT2 = "int2"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self in _FLOAT_DTYPE

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of a float precision."""
        return _FLOAT_DTYPE[self]

    @classmethod
    def parse(cls, text: str) -> "Precision":
        try:
            return cls(text.strip().lower())
        except ValueError:
            valid = ", ".join(p.value for p in cls)
            raise UserError(f"unknown precision {text!r}; valid precisions are: {valid}") from None

    @classmethod
    def parse_list(cls, text: str) -> list["Precision"]:
        items = [cls.parse(t) for t in text.split(",") if t.strip()]
        if not items:
            raise UserError(f"empty precision list {text!r}; give e.g. bf16,int8,int6,int4,int3,int2")
        return list(dict.fromkeys(items))


_BITS = {Precision.FP32: 32, Precision.BF16: 16, Precision.FP16: 16, Precision.INT8: 8, Precision.INT6: 6,
         Precision.INT4: 4, Precision.INT3: 3, Precision.INT2: 2}
_FLOAT_DTYPE = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}

DEFAULT_PRECISIONS = (Precision.BF16, Precision.INT8, Precision.INT6, Precision.INT4, Precision.INT3, Precision.INT2)
