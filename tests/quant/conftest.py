import pytest

from dynaexq.quant import lowbit_cpu


@pytest.fixture(scope="session")
def ext():
    """The native library's operators (torch.ops.dynaexq) of this CPU's build."""
    lib = lowbit_cpu.extension()
    if lib is None:
        pytest.skip("the C++ low-bit kernel did not build here (a warning said why)")
    return lib


@pytest.fixture(scope="session")
def avx2():
    """The AVX2 build of the C++ kernels' sources (what a CPU without AVX-512 gets)."""
    try:
        built = lowbit_cpu.build(("-mno-avx512f",))
    except Exception as e:
        pytest.skip(f"no AVX2 build: {e}")
    if built.isa() != 256:
        pytest.skip("this CPU has no AVX2+FMA+F16C")
    return built
