"""The storage format of every precision, per expert matrix: registered data, looked up, never if-chained.

An expert has two matrices, `gate_up` [2I, H] and `down` [H, I]; a precision names one format for each (as
llama.cpp's mixes give some tensors more bits). Kinds:
  float    the weight in a float dtype (fp32, bf16, fp16)
  int8     8-bit codes, one fp16 scale and zero per output row: W = (q - z) * s
  grouped  `bits`-bit codes in groups of `group` consecutive inputs of a row; per group an 8-bit scale code and
           an 8-bit offset code against fp16 ranges shared by a tile of 16 rows (K-quant style: the group's
           own scale costs 16 bits per group, not 32):  W = s * q + b,  s = ds * sc,  b = bmin + db * oc.
Chosen by measurement on the bundled model (GPTQ with calibration Hessians, mean KL on `dynaexq eval`'s
windows, bench/quant_formats.py): per-group 8-bit scale codes beat fp16 scale + zero at equal bits by 13-25 %,
and the `down` projection is the most sensitive matrix (2-bit down more than doubles int2's KL), so int2 keeps it
at 3 bits.
    precision  gate_up            down               bits / weight (+ 48 bits per 16 rows)
    int6       6-bit, groups 64   6-bit, groups 64   6.25
    int4       4-bit, groups 64   4-bit, groups 64   4.25
    int3       3-bit, groups 32   3-bit, groups 32   3.50
    int2       2-bit, groups 32   3-bit, groups 32   2.83 at the usual 2:1 gate_up:down size
"""
from __future__ import annotations

from dataclasses import dataclass

from dynaexq.quant.precision import Precision

TILE = 16  # rows sharing one fp16 range triple of a grouped matrix (the CPU kernel's panel)
MATRICES = ("gate_up", "down")


@dataclass(frozen=True)
class MatrixFormat:
    kind: str  # "float" | "int8" | "grouped"
    bits: int = 0
    group: int = 0  # inputs per group (grouped); a divisor of K below it where K is not a multiple

    def group_for(self, k: int) -> int:
        """The group along K for a matrix with K inputs (K for int8, 0 for floats)."""
        if self.kind == "float":
            return 0
        if self.kind == "int8":
            return k
        # the largest divisor of K up to the format's group (the group itself for every real model's K)
        return next(d for d in range(min(self.group, k), 0, -1) if k % d == 0)

    def nbytes(self, n: int, k: int, dtype_bytes: int = 2) -> int:
        """Stored bytes of an [n, k] matrix in this format."""
        from dynaexq.quant.packing import packed_nbytes

        if self.kind == "float":
            return n * k * dtype_bytes
        if self.kind == "int8":
            return n * k + 4 * n
        ng = -(-k // self.group_for(k))
        return packed_nbytes(n * k, self.bits) + 2 * n * ng + 6 * (-(-n // TILE))

    def describe(self) -> str:
        return {"float": "float", "int8": "int8 per row"}.get(self.kind, f"{self.bits}-bit g{self.group}")


@dataclass(frozen=True)
class Format:
    gate_up: MatrixFormat
    down: MatrixFormat

    def spec(self, matrix: str) -> MatrixFormat:
        return getattr(self, matrix)


def _same(m: MatrixFormat) -> Format:
    return Format(m, m)


FORMATS = {
    Precision.FP32: _same(MatrixFormat("float")),
    Precision.BF16: _same(MatrixFormat("float")),
    Precision.FP16: _same(MatrixFormat("float")),
    Precision.INT8: _same(MatrixFormat("int8", 8)),
    Precision.INT6: _same(MatrixFormat("grouped", 6, 64)),
    Precision.INT4: _same(MatrixFormat("grouped", 4, 64)),
    Precision.INT3: _same(MatrixFormat("grouped", 3, 32)),
    Precision.INT2: Format(MatrixFormat("grouped", 2, 32), MatrixFormat("grouped", 3, 32)),
}


def spec(precision: Precision, matrix: str) -> MatrixFormat:
    return FORMATS[precision].spec(matrix)


def manifest_entry(precision: Precision) -> dict:
    """What a store records of a precision's format (a reader refuses a store whose formats differ)."""
    f = FORMATS[precision]
    return {m: {"kind": f.spec(m).kind, "bits": f.spec(m).bits, "group": f.spec(m).group} for m in MATRICES}
