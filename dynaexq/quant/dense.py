"""Non-expert matrices at their planned precision, run by the experts' own kernels: the dense half of one budget.

`DenseLinear(kernel, bias)` takes the place of a transformers `nn.Linear` (attention projections, shared experts,
dense MLP layers, the output head) with the store's version of its weight (store/dense.py) at the planned
precision, prepared by quant.kernels: int8 and floats on the native row-major kernel (floats below
`gemm_rows()` rows, int8 below INT8_GEMM_ROWS; from there aten's GEMM), 2/3/4/6-bit on the fused low-bit kernel
(from LOWBIT_GEMM_ROWS bf16 rows, on a CPU with a native bf16 GEMM: that GEMM on the weight decoded into bf16),
each as one "tier" of one expert through the grouped driver (fp32 sums, one rounding into the activation
dtype); other backends call the kernel itself. `DenseEmbedding(kernel, dtype)` takes the place of the input
embedding and decodes only the rows a step reads from the same resident form, so a tied embedding and head
share one copy of the bytes.
`apply_plan(model, reader, plan)` swaps the modules of a plan {module name: Precision} (one planned at the model's
own dtype keeps its module); `native_floats(model)` then puts every float linear left on the native kernel over
its own tensor (transformers' bf16 matmul is the slower one on a CPU at decode's few rows), routers included:
they call F.linear on their own `weight`, which becomes a NativeWeight. Nothing here
decides precisions (runtime/planners/weights.py does).
"""
from __future__ import annotations

import torch
from torch import nn

from dynaexq.errors import UserError
from dynaexq.quant import grouped_cpu, kernels
from dynaexq.quant.lowbit_cpu import LowbitCpu
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import dequantize

DENSE = ("model", "int8", "bf16")  # --dense: the manual override of every attention/MLP linear (head kept)
# float weights from this many rows on run aten's GEMM (oneDNN; AVX512-BF16 where the CPU has it), below it the
# native kernel; measured for a [4096, 2048] bf16 matrix on 2 Zen 4 cores: 0.61 vs 1.17 ms at 1 row, 0.63 vs
# 0.96 at 4, 1.59 vs 1.10 at 8, 87 vs 22.6 at 512 (a prefill chunk). Without AVX512-BF16 the GEMM is kernels.
# FloatLinear's fp32 one on converted blocks, which the native kernel beats up to ~128 rows (AVX2 EPYC, 2
# threads, [2048, 4096] bf16, bench/int8_activations.py: 8.3 vs 21.7 ms at 32 rows, 33.8 vs 30.6 at 128, 132 vs
# 69 at 512)
FLOAT_GEMM_ROWS = 8
FLOAT_GEMM_ROWS_NO_BF16 = 128
# int8 weights from this many rows on run kernels.Int8Cpu.gemm (converting the codes costs a fixed ~9 ms per
# [4096, 2048]), below it the native tile; measured on 2 Xeon cores (AVX512-BF16) at 8 / 64 / 128 / 512 rows:
# 0.08 / 0.40 / 0.61 / 1.43x the native tile's speed for [4096, 2048], 0.08 / 0.47 / 0.85 / 1.88x for [2048, 4096]
INT8_GEMM_ROWS = 256
# 2/3/4/6-bit weights with bf16 x from this many rows on run LowbitCpu.gemm (W^T decoded into bf16 once per call,
# then aten's bf16 GEMM) where the CPU has a native bf16 GEMM, below it the tile; measured on 2 Xeon cores (AMX)
# for [4096, 2048] int6 / int4 at 32 / 64 / 128 / 512 rows: 1.94 / 3.80 / 7.43 / 30.9 ms (tile) against 2.67 /
# 2.95 / 3.43 / 5.95 (GEMM), int4 alike, [512, 2048] crossing at the same rows
LOWBIT_GEMM_ROWS = 64


def gemm_rows() -> int:
    """Rows from which a float weight runs a GEMM instead of the native row-major kernel, on this CPU."""
    return FLOAT_GEMM_ROWS if kernels.native_half_gemm() else FLOAT_GEMM_ROWS_NO_BF16


def _register(module: nn.Module, kernel) -> None:
    """The kernel's resident tensors as buffers: counted among the model's bytes (engine `weight_bytes`)."""
    held = kernel.qw.tensors() if not hasattr(kernel, "tensor_data_names") else {  # reference: the stored form
        name: getattr(kernel, name) for name in kernel.tensor_data_names}
    for name, t in held.items():
        if isinstance(t, torch.Tensor):
            module.register_buffer(f"w_{name}", t)


class DenseLinear(nn.Module):
    def __init__(self, kernel, bias: torch.Tensor | None, in_features: int, out_features: int, precision: str,
                 weight: nn.Parameter | None = None):
        """weight: the replaced module's own parameter when the kernel runs that very tensor (kept as `weight`,
        so the module still reads as that linear)."""
        super().__init__()
        self.kernel, self.in_features, self.out_features, self.precision = kernel, in_features, out_features, precision
        if weight is not None:
            self.weight = weight
        else:
            _register(self, kernel)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        spec = grouped_cpu.spec(kernel)  # None: no native form (the kernel's own call runs it)
        self._tier = None if spec is None else (spec[0], torch.tensor([spec[1]], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        gemm = isinstance(self.kernel, kernels.FloatLinear) and rows >= gemm_rows()
        if isinstance(self.kernel, kernels.Int8Cpu) and rows >= INT8_GEMM_ROWS:
            y = self.kernel.gemm(x2)
        elif isinstance(self.kernel, LowbitCpu) and rows >= LOWBIT_GEMM_ROWS and self.kernel.blob is not None \
                and x.dtype == torch.bfloat16 and kernels.native_half_gemm():
            y = self.kernel.gemm(x2.contiguous())
        elif self._tier is not None and x.device.type == "cpu" and grouped_cpu.supports(x.dtype) and not gemm:
            x2 = x2.contiguous()
            y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
            grouped_cpu.run(self._tier[0], torch.tensor([x2.shape[0]]), self._tier[1], x2, y)
        else:
            y = self.kernel(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.precision}"


class DenseEmbedding(nn.Module):
    def __init__(self, kernel, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, precision: str):
        super().__init__()
        self.kernel, self.num_embeddings, self.embedding_dim = kernel, num_embeddings, embedding_dim
        self.dtype, self.precision = dtype, precision
        _register(self, kernel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        k = self.kernel
        if isinstance(k, kernels.FloatLinear):
            rows = k.w[flat].to(self.dtype)
        elif isinstance(k, kernels.Int8Cpu):  # W = s * q + corr per row
            rows = (k.q[flat].float() * k.scale[flat, None].float() + k.corr[flat, None].float()).to(self.dtype)
        elif hasattr(k, "rows"):  # the fused low-bit kernel decodes the rows from its blob
            rows = k.rows(flat, self.dtype)
        else:  # the reference and dequantize kernels keep the stored weight
            rows = dequantize(k.qw, torch.float64)[flat].to(self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.precision}"


def apply_plan(model, reader, plan: dict, backend: str = "cpu") -> dict:
    """Swap the modules of `plan` {item name: Precision} for their store versions -> {module name: the module it
    replaced} (`restore` puts them back)."""
    items = reader.dense_items()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    swapped = {}
    for name, p in sorted(plan.items()):
        it = items[name]
        module = model.get_submodule(name)
        n, k = it["shape"]
        if p.is_float and module.weight.dtype == p.dtype:  # the model's own module already holds exactly this
            continue
        kernel = kernels.prepare(reader.read_dense(name, p), backend, None, device)
        if it["role"] in ("embedding", "tied") and getattr(kernel, "blob", True) is None:
            raise UserError(f"{name} at {p.value}: an embedding below int8 reads its rows with the native low-bit "
                            "kernel, which is not available here (see the warning); plan it at int8 or a float "
                            "precision (a map's \"dense\" section) or give a larger --weight-budget")
        if it["role"] in ("embedding", "tied"):
            swapped[name] = _set(model, name, DenseEmbedding(kernel, n, k, module.weight.dtype, p.value))
        if it["role"] == "tied" and head_name is not None:
            swapped[head_name] = _set(model, head_name, DenseLinear(kernel, getattr(head, "bias", None), k, n, p.value))
        if it["role"] == "linear":
            swapped[name] = _set(model, name, DenseLinear(kernel, module.bias, k, n, p.value))
    reader.close()
    return swapped


class NativeWeight(nn.Parameter):
    """The float weight of a module that calls F.linear on it itself (transformers' MoE routers: `F.linear(hidden,
    self.weight[, self.bias])`, measured 225 us per call for a cold [128, 2048] bf16 router at one row, 4 % of a
    30B-shaped decode step): that call runs the native row-major kernel over this very tensor below
    `gemm_rows()` rows on the CPU (from there kernels.FloatLinear: aten's GEMM, or fp32 blocks where aten has no
    native bf16 one); every other use is the plain tensor's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2 and isinstance(args[1], NativeWeight):
            x, w, bias = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type == "cpu" and x.dtype == w.dtype and x.shape[-1] == w.shape[1] and \
                    (bias is None or bias.dtype == w.dtype):
                x2 = x.reshape(-1, w.shape[1]).contiguous()
                with torch._C.DisableTorchFunctionSubclass():
                    if x2.shape[0] < gemm_rows():
                        y = torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype)
                        grouped_cpu.run(w.tier[0], torch.tensor([x2.shape[0]]), w.tier[1], x2, y)
                        y = y if bias is None else y + bias
                    else:  # the GEMM this CPU runs fastest, bias fused as F.linear fuses it
                        y = kernels.FloatLinear(w.as_subclass(torch.Tensor))(x2, bias)
                    return y.view(*x.shape[:-1], w.shape[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _router_weight(module: nn.Module) -> NativeWeight | None:
    """A router's weight as a NativeWeight over the same storage, or None (not a router, or no native form)."""
    w = getattr(module, "weight", None)
    if not type(module).__name__.endswith("Router") or type(w) is not nn.Parameter or w.dim() != 2 or \
            w.device.type != "cpu" or not w.dtype.is_floating_point or not w.is_contiguous():
        return None
    spec = grouped_cpu.spec(kernels.FloatLinear(w.detach()))
    if spec is None:
        return None
    native = NativeWeight(w.detach(), requires_grad=False)
    native.tier = (spec[0], torch.tensor([spec[1]], dtype=torch.int64))
    return native


def native_floats(model) -> dict:
    """Every nn.Linear left with a float weight on the CPU runs that very tensor on the native row-major kernel
    below `gemm_rows()` rows (a DenseLinear keeping it as `weight`) -> {module name: the module it replaced};
    a router's weight becomes a NativeWeight in place. Where no native kernel takes the shape, the module stays
    as it is."""
    swapped = {}
    for name, module in list(model.named_modules()):
        native = _router_weight(module)
        if native is not None:
            module.weight = native
            continue
        if type(module) is not nn.Linear or module.weight.device.type != "cpu":
            continue
        own = kernels.FloatLinear(module.weight.detach())
        if grouped_cpu.spec(own) is not None:
            p = next((p.value for p in Precision if p.is_float and p.dtype == module.weight.dtype), "float")
            swapped[name] = _set(model, name, DenseLinear(own, module.bias, module.in_features, module.out_features,
                                                          p, module.weight))
    return swapped


def restore(model, swapped: dict) -> None:
    """Undo `apply_plan` (its return value)."""
    for name, module in swapped.items():
        _set(model, name, module)


def _set(model, name: str, module: nn.Module) -> nn.Module:
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    setattr(owner, child, module)
    return old
