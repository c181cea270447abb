import pytest

from dynaexq.engine.load import load


@pytest.fixture(scope="module")
def engine(checkpoints):
    """A tiny Qwen3-MoE engine (2 MoE layers x 8 experts) whose runtime each test starts (rt.start)."""
    _, store = checkpoints("qwen3_moe")
    eng = load(store, "uniform:int2", progress=False)
    yield eng
    eng.close()
