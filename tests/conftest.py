import os
import secrets
import socket
import subprocess
import sys
import warnings
from pathlib import Path

# OpenMP threads that finish a parallel region spin (GOMP_SPINCOUNT, 300k by default) before they sleep; on a
# machine another process keeps busy, a spinning thread burns the time slice its partner needs and a test run
# takes several times longer (measured: tests/engine/test_batch.py 25 s idle, 210 s with both cores busy; 53 s
# with 1,000 spins, 32 s idle). Set before torch loads its OpenMP runtime.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
assert "torch" not in sys.modules, "torch was imported before tests/conftest.py could set GOMP_SPINCOUNT"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")

from models import make_checkpoint  # noqa: E402

ALL_PRECISIONS = ("fp32", "bf16", "int8", "int6", "int4", "int3", "int2")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint dir, store dir with every precision), built once per session."""
    from dynaexq.store.prepare import prepare

    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str):
        if arch not in cache:
            ckpt = make_checkpoint(arch, root / arch)
            store = prepare(ckpt, root / f"{arch}-store", precisions=ALL_PRECISIONS, progress=False)
            cache[arch] = (ckpt, store)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def bundled_store(tmp_path_factory):
    """The bundled model prepared once per session into a store with the default precisions, calibrated on its
    calibration texts as `dynaexq prepare` does (a smaller calibration set keeps the session quick)."""
    from dynaexq.demo import BUNDLED
    from dynaexq.engine.calibrate import prepare_store

    return prepare_store(BUNDLED, tmp_path_factory.mktemp("bundled") / "store", windows=32, progress=False)


RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A 2-CPU Ray head on 127.0.0.1 (the `ray` CLI of this environment), its address; stopped at the end."""
    # the cluster and every driver here (this process, the CLI runs) use one token of this session (Ray reads
    # these at import; a fresh machine has no ~/.ray/auth_token, and none is written there)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    before = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    pytest.importorskip("ray", reason="the ray extra: pip install 'dynaexq[ray]'")
    import ray
    port = _free_port()
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
                    "--include-dashboard", "false", "--disable-usage-stats"], check=True, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})
