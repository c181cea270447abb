"""ExpertBank: the module placed where transformers' `<Arch>Experts` was.

It is called exactly like the module it replaces, `bank(hidden [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`: group the T*K routed (token, expert) pairs by expert, run each
expert's tokens through the kernels of the version currently published for it, scale by the routing
weight, and add into the output. Routers, shared experts and everything else stay transformers'.

One forward, on one screen: route (the pairs grouped by expert, their token rows gathered, the statistics added),
then per wave of experts (`_waves`) the experts' matrices, then combine (each token's weighted outputs summed in
ascending expert order). A wave is every published expert when every expert is resident (no host sync) or, below the
floor (`residency` holds fewer than every expert), the routed experts the residency has made resident (in several
waves when it holds fewer than the layer routes to). Two paths compute a wave's experts (`path`): "grouped" (the
default) makes one native call per precision tier and matrix for all of the tier's routed pairs (quant.grouped_cpu:
the kernel walks the experts from a pointer table rebuilt only when a version changes) and routes, activates
(SwiGLU) and combines natively, so the calls per layer are bounded by the tiers, not the experts, and no routing
count reaches the host; "reference" is the per-expert loop in torch (one kernel call per routed expert, split points
synced to the host), kept as the path the grouped one is tested against. Experts whose kernel has no grouped form
(CUDA, biases, the float32 dequantize fallback) run the per-expert loop in either.

It also records, per expert, routed token counts and routed probability mass (the sum of routing
weights of the tokens that selected it) into device tensors without a host sync (rows of the engine's [L, E]
buffers, which its step reads and resets). The bank never decides precisions: `publish` (called
by the loader or the runtime's residency) is the only way a version changes, and a forward pass reads
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
        self.silu = glu == "swiglu" and config.hidden_act == "silu"  # the grouped path's native swiglu takes it
        self.alpha = getattr(config, "swiglu_alpha", None)
        self.limit = getattr(config, "swiglu_limit", None)
        self.versions: list[ExpertVersion | None] = [None] * num_experts  # published by Engine.apply or the table
        self.table = None  # the runtime's ExpertTable while the dynamic runtime runs: reads take a lease
        self.residency = None  # the runtime's Residency (runtime/residency.py): fetches what is not resident
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
        """hidden [T, H], top_k_index / top_k_weights [T, K] -> [T, H]: route, compute each wave's experts per tier,
        combine."""
        if self.calibrator is not None:  # `prepare`'s calibration pass (engine/calibrate.py) computes this layer
            return self.calibrator(self, hidden, top_k_index, top_k_weights)
        if self.recorder is not None:
            self.recorder.add(self.layer, top_k_index, top_k_weights)
        native = (self.path == "grouped" and hidden.device.type == "cpu" and grouped_cpu.available()
                  and grouped_cpu.supports(top_k_weights.dtype) and grouped_cpu.supports(hidden.dtype))
        route = grouped_cpu.route if native else self._route  # x [T*K, H]: the pairs' token rows grouped by expert
        counts, order, x = route(top_k_index, top_k_weights, hidden, self.num_experts, self.token_counts,
                                 self.routed_mass)
        ys = torch.empty_like(x)  # [T*K, H]
        read, faults = [None] * self.num_experts, {}
        for wave, failed in self._waves(counts):
            faults.update(failed)
            lease = self.table.acquire() if self.table is not None else None  # what is read stays unreclaimed
            try:
                versions = list(self.versions)  # one consistent snapshot for the wave
                if wave is None:
                    read = versions
                else:  # below the floor: only the wave's experts (the residency pins them)
                    snapshot, versions = versions, [None] * self.num_experts
                    for e in wave:
                        assert snapshot[e] is not None, (self.layer, e)
                        versions[e] = read[e] = snapshot[e]
                tiers, loop = self._tiers(versions) if native else \
                    ({}, [e for e, v in enumerate(versions) if v is not None])
                if tiers:
                    self._run_tiers(tiers, counts, x, ys)
                if loop:
                    self._loop(versions, loop, counts, x, ys)
            finally:
                if lease is not None:
                    self.table.release(lease)
        if faults:
            self._fault(faults, counts, ys, top_k_index)
        self.last_read = read
        self.routed_tokens += hidden.shape[0]
        if native and grouped_cpu.combines(hidden.shape[-1], top_k_index.shape[-1]):
            return grouped_cpu.combine(top_k_index, order, ys, top_k_weights)  # [T, H]
        ys.mul_(top_k_weights.reshape(-1)[order, None])  # the routing weights, one rounding for all pairs
        return self._combine(ys, order, top_k_index)

    def _waves(self, counts) -> list:
        """-> [(the experts to compute, None: every published one; {e: error} of routed ones that could not be
        made resident)]. Every expert resident: one wave, no host sync. Below the floor: the residency makes the routed
        experts resident, in waves when it holds fewer than the layer routes to (the forward waits for misses)."""
        if self.residency is None or self.residency.complete:
            return [(None, {})]
        routed = torch.nonzero(counts).flatten().tolist()  # host sync: which experts must be resident
        return self.residency.waves(self.layer, routed)

    def _run_tiers(self, tiers, counts, x, ys) -> None:
        """Every routed pair of the experts in `tiers`' pointer tables, one native call per tier and matrix:
        x [T*K, H] grouped by expert -> their rows of ys [T*K, H] (other rows untouched)."""
        h = torch.empty(x.shape[0], next(iter(tiers))[0][1], dtype=x.dtype)  # [T*K, 2I]
        for (gu_key, _), (gu_ptrs, _) in tiers.items():
            grouped_cpu.run(gu_key, counts, gu_ptrs, x, h)
        # [T*K, I] (rows of experts not in the tables: unused); one native call for SwiGLU (the per-expert loop
        # keeps transformers' ops: it is the path tested against transformers' own roundings)
        a = grouped_cpu.swiglu(h) if self.silu else self._activate(h).contiguous()
        for (_, dn_key), (_, dn_ptrs) in tiers.items():
            grouped_cpu.run(dn_key, counts, dn_ptrs, a, ys)

    def _fault(self, faults: dict, counts, ys, top_k_index) -> None:
        """Experts {e: error} could not be computed: their rows of ys [T*K, H] become zeros and the tokens routed
        to them [T] are reported to the residency's collector (the decoder fails their sequences, nothing else);
        with no collector (a plain `model(...)` call) the forward raises."""
        if self.residency.collect is None:
            raise next(iter(faults.values()))
        ends = torch.cumsum(counts, 0).tolist()
        for e in faults:
            ys[(ends[e - 1] if e else 0):ends[e]] = 0
        for e, err in faults.items():
            self.residency.collect.append(((top_k_index == e).any(-1).cpu(), str(err)))

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

    @staticmethod
    def _route(top_k_index, top_k_weights, hidden, num_experts, token_counts, routed_mass):
        """grouped_cpu.route in torch -> (counts [E], the grouping order [T*K], x [T*K, H]: each pair's token row,
        grouped by expert); the statistics added in place."""
        k = top_k_index.shape[-1]
        flat_e = top_k_index.reshape(-1)  # [T*K]
        counts = torch.bincount(flat_e, minlength=num_experts)  # [E]
        token_counts += counts  # statistics stay on the device: no sync here
        routed_mass.index_add_(0, flat_e, top_k_weights.detach().reshape(-1).float())  # statistics: no autograd
        order = torch.argsort(flat_e, stable=True)  # pairs grouped by expert, tokens ascending
        return counts, order, hidden[order // k]  # one gather for all experts

    def _loop(self, versions, experts, counts, x, ys):
        """The per-expert loop over `experts` (x, ys [T*K, H] grouped by expert): one kernel call per routed one."""
        ends = torch.cumsum(counts, 0).tolist()  # the split points are needed on the host
        for e in experts:
            start, end = ends[e - 1] if e else 0, ends[e]
            if end > start:
                v = versions[e]
                ys[start:end] = v.down(self._activate(v.gate_up(x[start:end])))  # [n, H]

    def _tiers(self, versions) -> tuple[dict, list]:
        """-> ({(gate_up key, down key): (gate_up pointers [E, 3], down pointers [E, 3])}, the experts with no
        grouped form), cached until a version changes (the cache holds the versions: their ids stay theirs).
        Only for the native path (CPU, a dtype the kernels take: forward checks)."""
        built, cached = self._tiers_of
        if len(built) == len(versions) and all(a is b for a, b in zip(built, versions)):
            return cached
        tiers, loop = {}, []
        none = [(0, 0, 0)] * len(versions)
        for e, v in enumerate(versions):
            if v is None:  # not computed in this call (another wave's, or not resident)
                continue
            gu, dn = grouped_cpu.spec(v.gate_up), grouped_cpu.spec(v.down)
            if gu is None or dn is None:
                loop.append(e)
                continue
            ptrs = tiers.setdefault((gu[0], dn[0]), (list(none), list(none)))
            ptrs[0][e], ptrs[1][e] = gu[1], dn[1]
        tiers = {key: tuple(torch.tensor(p, dtype=torch.int64) for p in ptrs) for key, ptrs in tiers.items()}
        self._tiers_of = tuple(versions), (tiers, loop)
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
