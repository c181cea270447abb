"""`prepare --ray`: on a real Ray cluster started here on 127.0.0.1 (2 CPUs, once per session), the store equals a
local prepare's digest for digest; a worker killed mid-task is retried and the store is still that store; a
driver killed mid-run resumes from the layers it finished."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dynaexq.demo import BUNDLED
from dynaexq.engine.calibrate import prepare_store

pytestmark = pytest.mark.slow
WINDOWS = 8  # calibration windows: the same in every prepare compared here


@pytest.fixture(scope="session")
def local_store(tmp_path_factory):
    return prepare_store(BUNDLED, tmp_path_factory.mktemp("local") / "store", windows=WINDOWS, progress=False)


def _digests(store: Path) -> dict:
    m = json.loads((store / "manifest.json").read_text())
    return {"shards": {k: v["sha256"] for k, v in m["shards"].items()}, "experts": m["experts"],
            "dense": m["dense"], "params": m["params_sha256"]}


def _ray_prepare(address, out):
    from dynaexq.store.distributed import RayRunner
    return prepare_store(BUNDLED, out, windows=WINDOWS, progress=False, runner=RayRunner(address))


def test_a_distributed_prepare_is_the_local_store_digest_for_digest(ray_cluster, local_store, tmp_path):
    store = _ray_prepare(ray_cluster, tmp_path / "store")
    assert _digests(store) == _digests(local_store)


def test_a_worker_killed_mid_task_is_retried_and_the_store_is_unchanged(ray_cluster, local_store, tmp_path):
    import psutil
    killed, stop = [], threading.Event()

    def killer():  # SIGKILL the first worker seen running a chunk (Ray titles it ray::quantize_chunk)
        while not stop.is_set() and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "ray::quantize_chunk" in " ".join(p.info["cmdline"] or []):
                    os.kill(p.info["pid"], signal.SIGKILL)
                    killed.append(p.info["pid"])
                    break
            time.sleep(0.002)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        store = _ray_prepare(ray_cluster, tmp_path / "store")
    finally:
        stop.set()
        t.join(5)
    assert killed, "no worker was caught running a chunk"
    assert _digests(store) == _digests(local_store)


def test_a_killed_driver_resumes_and_the_store_is_unchanged(ray_cluster, local_store, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "dynaexq.cli", "prepare", str(BUNDLED), "--out", str(out), "--calibration-windows",
           str(WINDOWS), "--ray", ray_cluster]
    env = {**os.environ, "DYNAEXQ_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def sidecars():  # a layer's shard at a precision is finished once its sidecar is written
        return sorted((out / "experts").glob("*.json")) if (out / "experts").is_dir() else []

    deadline = time.monotonic() + 300
    while not sidecars():
        assert proc.poll() is None and time.monotonic() < deadline, "the driver ended before finishing a shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # killed before the end
    kept = {side: side.with_suffix(".safetensors").stat().st_mtime_ns for side in sidecars()}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # the finished shards were kept, not written again; the rest was; the store is the local one
    assert all(side.with_suffix(".safetensors").stat().st_mtime_ns == t for side, t in kept.items())
    assert len(sidecars()) > len(kept)
    assert _digests(out) == _digests(local_store)
    shutil.rmtree(out)
