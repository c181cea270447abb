"""ExpertBank: the module placed where transformers' `<Arch>Experts` was.

It is called exactly like the module it replaces, `bank(hidden [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`: group the T*K routed (token, expert) pairs by expert, run each
expert's tokens through the kernels of the version currently published for it, scale by the routing
weight, and add into the output. Routers, shared experts and everything else stay transformers'.

Two paths compute the experts (`path`): "grouped" (the default) makes one native call to route (counts, the
pairs grouped by expert, their token rows, the statistics), per precision tier present in the layer one call
per matrix for all of the tier's routed pairs (quant.grouped_cpu: the kernel walks the experts from a pointer
table rebuilt only when a version changes), and one to combine, so the calls per layer are bounded by the tiers,
not the experts, and no routing count reaches the host; "reference" is the per-expert loop (one kernel call per routed
expert, split points synced to the host), kept as the path the grouped one is tested against. Experts whose
kernel has no grouped form (CUDA, biases, the float32 dequantize fallback) run the per-expert loop in either.
In the offload regime (`cache` set) the routed experts are made resident first, in waves when the cache holds
fewer than the layer routes to (`_offloaded`).

It also records, per expert, routed token counts and routed probability mass (the sum of routing
weights of the tokens that selected it) into device tensors without a host sync (rows of the engine's [L, E]
buffers, which its step reads and resets). The bank never decides precisions: `publish` (called
by the loader or the transition engine) is the only way a version changes, and a forward pass reads
the version list once, so it always computes with complete versions.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from dynaexq.quant import grouped_cpu
from dynaexq.runtime.version import ExpertVersion


class ExpertBank(nn.Module):
    def __init__(self, config, num_experts: int, glu: str = "swiglu"):
        super().__init__()
        self._is_hf_initialized = True  # nothing for transformers' weight init to touch
        self.num_experts = num_experts
        self.layer = -1  # set by the loader
        self.glu = glu
        self.act_fn = ACT2FN[config.hidden_act] if glu == "swiglu" else None
        self.alpha = getattr(config, "swiglu_alpha", None)
        self.limit = getattr(config, "swiglu_limit", None)
        self.versions: list[ExpertVersion | None] = [None] * num_experts  # published by Engine.apply or the table
        self.table = None  # the runtime's ExpertTable while the dynamic runtime runs: reads take a lease
        self.cache = None  # the offload regime's ExpertCache (runtime/offload.py): some experts are not resident
        self.calibrator = None  # set only while `prepare` calibrates: it computes the layer from source experts
        self.recorder = None  # trace.RoutingRecorder while the engine records routing
        self.routed_tokens = 0  # tokens routed since the controller last looked (a host int: no sync)
        self.last_read: list = []  # the versions the last forward computed with (tests check against them)
        self.path = "grouped"  # or "reference": the per-expert loop (see the module docstring)
        self._tiers_of = ((), None)  # (the versions it was built from, their tiers): rebuilt when one changes
        self.register_buffer("token_counts", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("routed_mass", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def publish(self, e: int, version: ExpertVersion) -> ExpertVersion | None:
        """Atomically make `version` the one forward passes use for expert e; returns the old one."""
        old, self.versions[e] = self.versions[e], version
        return old

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.calibrator is not None:  # `prepare`'s calibration pass (engine/calibrate.py) computes this layer
            return self.calibrator(self, hidden, top_k_index, top_k_weights)
        if self.recorder is not None:
            self.recorder.add(self.layer, top_k_index, top_k_weights)
        if self.cache is not None:
            return self._offloaded(hidden, top_k_index, top_k_weights)
        table = self.table
        lease = table.acquire() if table is not None else None  # the versions read below stay unreclaimed
        try:
            versions = list(self.versions)  # one consistent snapshot for the whole pass
            tiers, loop = self._tiers(versions, hidden) if self.path == "grouped" else ({}, ())
            if tiers and grouped_cpu.supports(top_k_weights.dtype):
                out = self._grouped(versions, tiers, loop, hidden, top_k_index, top_k_weights)
            else:
                out = self._combine(*self._experts(versions, hidden, top_k_index, top_k_weights), top_k_index)
        finally:
            if lease is not None:
                table.release(lease)
        self.last_read = versions
        self.routed_tokens += hidden.shape[0]
        return out

    def _grouped(self, versions, tiers, loop, hidden, top_k_index, top_k_weights):
        """The grouped path: one native call routes, one per tier and matrix computes, one combines."""
        counts, order, x = grouped_cpu.route(top_k_index, top_k_weights, hidden, self.num_experts,
                                             self.token_counts, self.routed_mass)  # x [T*K, H] grouped by expert
        ys = torch.empty_like(x)  # [T*K, H]
        self._run_tiers(tiers, counts, x, ys)
        if loop:
            self._loop(versions, loop, counts, x, ys)
        if grouped_cpu.combines(hidden.shape[-1], top_k_index.shape[-1]):
            return grouped_cpu.combine(top_k_index, order, ys, top_k_weights)  # [T, H]
        ys.mul_(top_k_weights.reshape(-1)[order, None])  # a shape the native combine does not take: torch's
        return self._combine(ys, order, top_k_index)

    def _run_tiers(self, tiers, counts, x, ys) -> None:
        """Every routed pair of the experts in `tiers`' pointer tables, one native call per tier and matrix:
        x [T*K, H] grouped by expert -> their rows of ys [T*K, H] (other rows untouched)."""
        h = torch.empty(x.shape[0], next(iter(tiers))[0][1], dtype=x.dtype)  # [T*K, 2I]
        for (gu_key, _), (gu_ptrs, _) in tiers.items():
            grouped_cpu.run(gu_key, counts, gu_ptrs, x, h)
        a = self._activate(h).contiguous()  # [T*K, I] (rows of experts not in the tables: unused)
        for (_, dn_key), (_, dn_ptrs) in tiers.items():
            grouped_cpu.run(dn_key, counts, dn_ptrs, a, ys)

    def _offloaded(self, hidden, top_k_index, top_k_weights):
        """The offload regime: route once, then per wave of routed experts (all of them unless the cache holds
        fewer) make them resident (the cache fetches misses; the forward waits only for those), take the lease,
        compute the wave's experts from its snapshot, release; combine once. An expert that cannot be made
        resident fails only the tokens routed to it (`_fault`); the others are computed as usual."""
        grouped = self.path == "grouped" and grouped_cpu.supports(top_k_weights.dtype) and hidden.device.type == "cpu"
        if grouped:
            counts, order, x = grouped_cpu.route(top_k_index, top_k_weights, hidden, self.num_experts,
                                                 self.token_counts, self.routed_mass)
        else:
            counts, order, x = self._route(hidden, top_k_index, top_k_weights)
        ys = torch.empty_like(x)  # [T*K, H]
        read, faults = [None] * self.num_experts, {}
        routed = torch.nonzero(counts).flatten().tolist()  # host sync: which experts must be resident
        for wave, failed in self.cache.waves(self.layer, routed):
            faults.update(failed)
            lease = self.table.acquire()
            try:
                versions = list(self.versions)
                sub = [None] * self.num_experts
                for e in wave:
                    assert versions[e] is not None, (self.layer, e)  # pinned by the cache
                    sub[e] = read[e] = versions[e]
                tiers, loop = self._tiers(sub, hidden) if grouped else ({}, wave)
                if tiers:
                    self._run_tiers(tiers, counts, x, ys)
                if loop:
                    self._loop(sub, loop, counts, x, ys)
            finally:
                self.table.release(lease)
        if faults:
            self._fault(faults, counts, ys, top_k_index)
        self.last_read = read
        self.routed_tokens += hidden.shape[0]
        if grouped and grouped_cpu.combines(hidden.shape[-1], top_k_index.shape[-1]):
            return grouped_cpu.combine(top_k_index, order, ys, top_k_weights)
        ys.mul_(top_k_weights.reshape(-1)[order, None])
        return self._combine(ys, order, top_k_index)

    def _fault(self, faults: dict, counts, ys, top_k_index) -> None:
        """Experts {e: error} could not be computed: their rows of ys [T*K, H] become zeros and the tokens routed
        to them [T] are reported to the cache's collector (the decoder fails their sequences, nothing else);
        with no collector (a plain `model(...)` call) the forward raises."""
        if self.cache.collect is None:
            raise next(iter(faults.values()))
        ends = torch.cumsum(counts, 0).tolist()
        for e in faults:
            ys[(ends[e - 1] if e else 0):ends[e]] = 0
        for e, err in faults.items():
            self.cache.collect.append(((top_k_index == e).any(-1).cpu(), str(err)))

    def _combine(self, ys, order, top_k_index):
        k = top_k_index.shape[-1]
        # back to (token, slot) order, then each token's K outputs added in ascending expert order: the very
        # roundings of transformers' per-expert `index_add_` (which is slow on the CPU in bf16), without it
        by_expert = top_k_index.argsort(dim=-1, stable=True)  # [T, K]
        slot_of_pair = torch.empty_like(order)
        slot_of_pair[order] = torch.arange(order.numel(), device=order.device)
        rows = slot_of_pair.view(-1, k).gather(1, by_expert)  # [T, K]: row of ys per token, by expert id
        out = ys[rows[:, 0]]
        for j in range(1, k):
            out = out + ys[rows[:, j]]
        return out

    def _route(self, hidden, top_k_index, top_k_weights):
        """-> (counts [E], the grouping order [T*K], x [T*K, H]: each pair's token row, grouped by expert)."""
        k = top_k_index.shape[-1]
        flat_e = top_k_index.reshape(-1)  # [T*K]
        counts = torch.bincount(flat_e, minlength=self.num_experts)  # [E]
        self.token_counts += counts  # statistics stay on the device: no sync here
        self.routed_mass.index_add_(0, flat_e, top_k_weights.detach().reshape(-1).float())  # statistics: no autograd
        order = torch.argsort(flat_e, stable=True)  # pairs grouped by expert, tokens ascending
        return counts, order, hidden[order // k]  # one gather for all experts

    def _experts(self, versions, hidden, top_k_index, top_k_weights):
        """-> (ys [T*K, H]: each routed pair's weighted output, grouped by expert; the grouping order [T*K])."""
        counts, order, x = self._route(hidden, top_k_index, top_k_weights)
        ys = torch.empty_like(x)  # [T*K, H]
        self._loop(versions, range(self.num_experts), counts, x, ys)
        ys.mul_(top_k_weights.reshape(-1)[order, None])  # routing weights for all pairs at once (one rounding)
        return ys, order

    def _loop(self, versions, experts, counts, x, ys):
        """The per-expert loop over `experts` (x, ys [T*K, H] grouped by expert): one kernel call per routed one."""
        ends = torch.cumsum(counts, 0).tolist()  # the split points are needed on the host
        for e in experts:
            start, end = ends[e - 1] if e else 0, ends[e]
            if end > start:
                v = versions[e]
                ys[start:end] = v.down(self._activate(v.gate_up(x[start:end])))  # [n, H]

    def _tiers(self, versions, hidden) -> tuple[dict, list]:
        """-> ({(gate_up key, down key): (gate_up pointers [E, 3], down pointers [E, 3])}, the experts with no
        grouped form), cached until a version changes (the cache holds the versions: their ids stay theirs)."""
        built, cached = self._tiers_of
        if len(built) == len(versions) + 1 and built[0] == (hidden.dtype, hidden.device) and \
                all(a is b for a, b in zip(built[1:], versions)):
            return cached
        tiers, loop = {}, []
        ok = grouped_cpu.supports(hidden.dtype) and hidden.device.type == "cpu"
        none = [(0, 0, 0)] * len(versions)
        for e, v in enumerate(versions):
            if v is None:  # not computed in this call (the offload regime's other waves / not resident)
                continue
            gu, dn = (grouped_cpu.spec(v.gate_up), grouped_cpu.spec(v.down)) if ok else (None, None)
            if gu is None or dn is None:
                loop.append(e)
                continue
            ptrs = tiers.setdefault((gu[0], dn[0]), (list(none), list(none)))
            ptrs[0][e], ptrs[1][e] = gu[1], dn[1]
        tiers = {key: tuple(torch.tensor(p, dtype=torch.int64) for p in ptrs) for key, ptrs in tiers.items()}
        self._tiers_of = ((hidden.dtype, hidden.device), *versions), (tiers, loop)
        return tiers, loop

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.glu == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        gate, up = h[..., ::2], h[..., 1::2]  # gpt_oss: interleaved, clamped
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        held = [v.precision.value for v in self.versions if v is not None]
        summary = {p: held.count(p) for p in dict.fromkeys(held)}
        return f"layer={self.layer}, experts={self.num_experts}, precisions={summary}"
