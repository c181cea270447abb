"""The native kernels as PyTorch operators (csrc/ops.cpp): torch.library.opcheck holds each operator's schema,
fake implementation and registration to what the kernel does; torch.compile traces them in one graph; bad
tensors get an error naming the problem."""
import pytest
import torch

from dynaexq.quant import attention_cpu, grouped_cpu, kernels
from dynaexq.quant.packing import pack
from dynaexq.quant.precision import Precision
from dynaexq.quant.quantize import QuantizedWeight, _gptq


@pytest.fixture(scope="module")
def blob():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    codes, sc, oc, ranges = _gptq(w[None], 4, 32, None)
    qw = QuantizedWeight(Precision.INT4, (64, 128), 4, 32, pack(codes[0], 4), sc[0], oc[0], ranges[0])
    return qw, kernels.prepare(qw, "cpu").blob


WF = torch.randn(64, 128)  # a float32 weight for the row-major kernel (alive as long as the module)


def _cases(ext, qw, blob):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    idx = torch.tensor([[0, 2], [1, 2], [0, 3]])
    w = torch.rand(3, 2, generator=g)
    hidden = torch.randn(3, 128, generator=g)
    counts, order, xs = ext.route(idx, w, hidden, 4, torch.zeros(4, dtype=torch.int64), torch.zeros(4))
    ptrs = torch.tensor([[blob.data_ptr(), 0, 0]] * 4)
    ys = torch.randn(6, 128, generator=g)
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32)
    return {
        "lowbit_mm": (x, blob, 4, qw.group_size, 64),
        "lowbit_grouped": (xs, counts, ptrs, torch.zeros(6, 64), 4, qw.group_size),
        "lowbit_rows": (blob, torch.tensor([5, 0, 63]), 4, qw.group_size, 64, 128, torch.bfloat16),
        "lowbit_decode": (blob, 4, qw.group_size, 64, 128, 16, 32),
        "rowmajor_grouped": (xs, counts, torch.tensor([[WF.data_ptr(), 0, 0]] * 4), torch.zeros(6, 64), 0),
        "route": (idx, w, hidden, 4, torch.zeros(4, dtype=torch.int64), torch.zeros(4)),
        "combine": (idx, order, ys, w),
        "decode_attention": (q, k, v, torch.tensor([8, 5]), 0.125),
        "rms_norm": (x, torch.randn(128).to(torch.bfloat16), 1e-6, True),
        "argmax": (torch.randn(2, 1000),),
        "qk_rope_cache": (q[:, :, 0], torch.randn(2, 2, 32), torch.randn(2, 2, 32), torch.randn(32), torch.randn(32),
                          1e-6, torch.randn(2, 32), torch.randn(2, 32), torch.zeros(3, 2, 8, 32),
                          torch.zeros(3, 2, 8, 32), torch.tensor([2, 0]), torch.tensor([7, 3])),
        "swiglu": (torch.randn(5, 64, generator=g).to(torch.bfloat16),),
        "softmax_topk": (torch.randn(3, 16, generator=g).to(torch.bfloat16), 4, True, torch.bfloat16),
    }


@pytest.mark.parametrize("name", ["lowbit_mm", "lowbit_grouped", "lowbit_rows", "lowbit_decode", "rowmajor_grouped",
                                  "route", "combine", "decode_attention", "rms_norm", "argmax", "qk_rope_cache",
                                  "swiglu", "softmax_topk"])
def test_each_operator_passes_torch_library_opcheck(ext, blob, name):
    """Schema (what it mutates), fake implementation (shapes, dtypes, strides) and registration agree with the
    kernel's real outputs: PyTorch's own check for custom operators."""
    args = _cases(ext, *blob)[name]
    torch.library.opcheck(getattr(ext, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_operators_trace_into_one_compiled_graph_with_eager_results(ext, blob):
    """A decode-shaped chain of the operators (norm, low-bit projection, attention, argmax) under torch.compile
    with fullgraph=True: no graph break, and the same values as the eager calls."""
    qw, b = blob
    kernel = kernels.prepare(qw, "cpu")
    g = torch.Generator().manual_seed(2)
    x, nw = torch.randn(1, 128, generator=g), torch.randn(128, generator=g)
    k, v = torch.randn(1, 2, 16, 16, generator=g), torch.randn(1, 2, 16, 16, generator=g)
    lens = torch.tensor([11])

    def step(x):
        h = ext.rms_norm(x, nw, 1e-6, True)  # [1, 128]
        q = ext.lowbit_mm(h, b, 4, qw.group_size, 64).view(1, 4, 1, 16)  # [B, Hq, 1, D]
        a = ext.decode_attention(q, k, v, lens, 0.25)  # [1, 1, 4, 16]
        return a, ext.argmax(a.reshape(1, 64))

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    assert torch.equal(kernel(ext.rms_norm(x, nw, 1e-6, True)), ext.lowbit_mm(ext.rms_norm(x, nw, 1e-6, True), b, 4,
                                                                                 qw.group_size, 64))


def test_bad_tensors_are_refused_with_the_problem_named(ext, blob):
    qw, b = blob
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        ext.lowbit_mm(torch.zeros(1, 128, dtype=torch.int32), b, 4, qw.group_size, 64)
    with pytest.raises(RuntimeError, match="does not hold a 4-bit"):
        ext.lowbit_mm(torch.zeros(1, 128), b[:-1], 4, qw.group_size, 64)
    with pytest.raises(RuntimeError, match="one query position"):
        attention_cpu.decode_attention(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
                                       torch.tensor([4]), 1.0)
    with pytest.raises(ValueError, match="outside"):
        grouped_cpu.route(torch.tensor([[7]]), torch.ones(1, 1), torch.zeros(1, 16), 4,
                          torch.zeros(4, dtype=torch.int64), torch.zeros(4))
