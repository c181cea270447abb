"""`prepare --ray [ADDRESS]`: the per-chunk quantization of every MoE layer as Ray tasks across a cluster.

The calibration forward (which captures each layer's per-expert input statistics) stays sequential in the driver;
each layer's experts are cut into chunks as in a local prepare, and each chunk's `quantize_chunk` (a pure
function of the source weights and second moments: GPTQ is deterministic) runs as a Ray task on any node's CPU.
The driver keeps at most `window` chunks in flight (bounded memory), takes their results back in chunk order and
writes the shards itself, so the store's layout, manifest and digests are those of a local prepare, byte for
byte. A task whose worker dies is retried by Ray (`max_retries`); a driver that dies leaves the finished layers'
shards and sidecars, which the next run keeps (store/prepare.py). Every node imports dynaexq itself: install the
same version there (a cluster started from the driver's environment, `ray start --head` in it, has it).
"""
from __future__ import annotations

import sys
from collections import deque

from dynaexq.cluster import connect

RETRIES = 3  # a chunk whose worker dies is run again this many times


class RayRunner:
    """runner(fn, inputs) -> fn(*args) for each argument tuple, in order, computed as Ray tasks."""

    def __init__(self, address: str | None = None, window: int | None = None):
        self.ray = ray = connect(address)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = window or cpus + 1  # every CPU busy, one chunk's inputs ready behind them
        print(f"dynaexq: prepare on the Ray cluster at {ray.get_runtime_context().gcs_address} ({cpus} CPUs)",
              file=sys.stderr)
        self._remote = {}

    def __call__(self, fn, inputs):
        task = self._remote.get(fn)
        if task is None:
            task = self._remote[fn] = self.ray.remote(num_cpus=1, max_retries=RETRIES)(fn)
        pending = deque()
        for args in inputs:
            pending.append(task.remote(*args))
            if len(pending) >= self.window:
                yield self.ray.get(pending.popleft())
        while pending:
            yield self.ray.get(pending.popleft())

