"""Which format per precision: mean KL on the bundled model of candidate expert formats at their bits per weight.

Command (~6 min on 2 cores):

    .venv/bin/python bench/quant_formats.py

What it measures
  The bundled model (3 domains x 16 windows x 256 tokens, dynaexq eval's windows and reference). Each
  candidate quantizes every expert (gate_up and down), and the *dequantized* weights are published in float32,
  so the KL is the format's alone (no kernel in the way). Second moments H = E[x x^T] of each expert's two
  inputs come from the bundled model's calibration texts (128 x 256 tokens, pooled with the layer mean as 64
  pseudo-tokens), as `prepare` computes them. Candidates:
    rtn / gptq       the store's formats (quant/formats.py) without and with GPTQ against H
    fp16-scales      GPTQ with an fp16 scale and offset per group (the previous store format) at the same bits
    2-bit down       int2 with its down projection at 2 bits too
    salient 1%       int3 with the 1 % of input channels of largest E[x^2] kept in fp16, processed last by GPTQ so
                     they absorb the others' error (DynaMo's salient channels, dense-and-sparse), against
                     spending the same bytes on smaller groups
  bits/weight counts every stored byte (codes, scale codes or fp16 scales, ranges, fp16 salient columns).
Output: a human table, then one JSON object on the last stdout line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dynaexq.demo import BUNDLED  # noqa: E402
from dynaexq.engine.calibrate import POOL, prepare_store  # noqa: E402
from dynaexq.engine.model import calibration_files, calibration_tokens  # noqa: E402
from dynaexq.eval.harness import Evaluation, parse_data  # noqa: E402
from dynaexq.quant import quantize as Q  # noqa: E402
from dynaexq.quant.kernels import FloatLinear  # noqa: E402
from dynaexq.quant.precision import Precision  # noqa: E402
from dynaexq.runtime.version import ExpertVersion  # noqa: E402


@torch.inference_mode()
def moments(ev, ref):
    """{(layer, e): {"gate_up": H_x, "down": H_h}} pooled as prepare pools them."""
    files = calibration_files(BUNDLED, None, None)
    ids = calibration_tokens(ev.engine.tokenizer, files, 128, 256)
    publish(ev, ref)
    raw, hooks = {}, []
    for layer, bank in ev.engine.banks.items():
        def hook(mod, args, out, layer=layer):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            idx = args[1]
            for e in range(mod.num_experts):
                xe = x[(idx == e).any(-1)]
                g, u = (xe @ ref[(layer, e)][0].double().T).chunk(2, -1)
                h = F.silu(g) * u
                r = raw.setdefault((layer, e), [0, 0.0, 0.0])
                r[0] += len(xe)
                r[1] = r[1] + xe.T @ xe
                r[2] = r[2] + h.T @ h
        hooks.append(bank.register_forward_hook(hook))
    for i in range(0, len(ids), 8):
        ev.engine.model(input_ids=ids[i:i + 8])
    for h in hooks:
        h.remove()
    out = {}
    for layer in ev.engine.banks:
        n = sum(raw[(layer, e)][0] for e in range(32))
        mx = sum(raw[(layer, e)][1] for e in range(32)) / n
        mh = sum(raw[(layer, e)][2] for e in range(32)) / n
        for e in range(32):
            c, xx, hh = raw[(layer, e)]
            out[(layer, e)] = {"gate_up": ((xx + POOL * mx) / (c + POOL)).float(),
                               "down": ((hh + POOL * mh) / (c + POOL)).float()}
    return out


def publish(ev, weights):
    for (layer, e), (gu, dn) in weights.items():
        ev.engine.banks[layer].publish(e, ExpertVersion(Precision.FP32, FloatLinear(gu.float().contiguous()),
                                                        FloatLinear(dn.float().contiguous())))


def grouped(bits, g, use_h=True):
    """The store's grouped format with `bits` and groups of g: -> fn(w, H) -> (dequantized, stored bytes)."""
    def fn(w, H):
        codes, sc, oc, ranges = Q._gptq(w[None].float(), bits, g, Q.factor(H[None]) if use_h else None)
        qw = Q.QuantizedWeight(Precision.INT4, tuple(w.shape), bits, g, Q.pack(codes[0], bits), sc[0], oc[0],
                               ranges[0])
        return Q.dequantize(qw), qw.nbytes
    return fn


def fp16_scales(bits, g):
    """GPTQ with fp16 scale and offset per group (the previous store format's metadata)."""
    def fn(w, H):
        W = w.double().clone()
        n, k = W.shape
        H = H.double().clone()
        H += Q.DAMP * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        qmax, out, d = (1 << bits) - 1, torch.zeros_like(W), torch.diag(H)
        for c0 in range(0, k, g):
            s, b = Q._fit(W[:, c0:c0 + g].float(), d[c0:c0 + g].float().expand(n, g), qmax)
            s, b = s.half().double().clamp(min=1e-12), b.half().double()
            for j in range(c0, c0 + g):
                q = torch.round((W[:, j:j + 1] - b) / s).clamp(0, qmax)
                out[:, j] = (s * q + b)[:, 0]
                err = (W[:, j] - out[:, j]) / Hinv[j, j]
                W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None]
        return out.float(), (n * k * bits + 32 * n * (k // g)) // 8
    return fn


def salient(bits, g, frac=0.01):
    """Grouped GPTQ on all but the `frac` loudest inputs (largest diag H), which stay fp16 and go last."""
    def fn(w, H):
        n, k = w.shape
        s = max(1, round(frac * k))
        loud = torch.topk(torch.diag(H), s).indices
        rest = torch.tensor([c for c in range(k) if c not in set(loud.tolist())])
        perm = torch.cat([rest, loud])
        Wp, Hp = w[:, perm].double(), H[perm][:, perm].double()
        Hp += Q.DAMP * torch.diag(Hp).mean() * torch.eye(k, dtype=Hp.dtype)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hp)), upper=True)
        kq = len(rest)  # the quantized columns, in groups of g (the last one shorter)
        qmax, d, out = (1 << bits) - 1, torch.diag(Hp), Wp.clone()
        for c0 in range(0, kq, g):
            c1 = min(c0 + g, kq)
            sc, b = Q._fit(Wp[:, c0:c1].float(), d[c0:c1].float().expand(n, c1 - c0), qmax)
            sc, b = sc.double(), b.double()
            for j in range(c0, c1):
                q = torch.round((Wp[:, j:j + 1] - b) / sc).clamp(0, qmax)
                out[:, j] = (sc * q + b)[:, 0]
                err = (Wp[:, j] - out[:, j]) / Hinv[j, j]
                Wp[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None]
        out[:, kq:] = Wp[:, kq:].half().double()  # the salient columns, compensated, in fp16
        res = torch.empty_like(out)
        res[:, perm] = out
        nbytes = (n * kq * bits + 16 * n * -(-kq // g)) // 8 + 2 * n * (k - kq) + 2 * (k - kq) + 6 * (n // 16)
        return res.float(), nbytes
    return fn


def main() -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    store = prepare_store(BUNDLED, Path("/tmp/dynaexq-quant-formats-store"), progress=False)
    ev = Evaluation(BUNDLED, parse_data(None, BUNDLED), 16, 256, store=store, progress=False)
    ref = {}
    for layer in ev.reader.layers:
        for e in range(ev.reader.num_experts):
            w = ev.reader.read_expert(layer, e, Precision.BF16)
            ref[(layer, e)] = (w["gate_up"].data.float(), w["down"].data.float())
    H = moments(ev, ref)
    cands = {
        "int4 rtn (4-bit g64)": (grouped(4, 64, False), grouped(4, 64, False)),
        "int4 gptq (4-bit g64)": (grouped(4, 64), grouped(4, 64)),
        "int4 fp16-scales g128": (fp16_scales(4, 128), fp16_scales(4, 128)),
        "int3 rtn (3-bit g32)": (grouped(3, 32, False), grouped(3, 32, False)),
        "int3 gptq (3-bit g32)": (grouped(3, 32), grouped(3, 32)),
        "int3 fp16-scales g64": (fp16_scales(3, 64), fp16_scales(3, 64)),
        "int3 salient 1% (3-bit g32)": (salient(3, 32), salient(3, 32)),
        "int3 gptq 3-bit g16": (grouped(3, 16), grouped(3, 16)),
        "int2 rtn (2-bit g32 / down 3-bit)": (grouped(2, 32, False), grouped(3, 32, False)),
        "int2 gptq (2-bit g32 / down 3-bit)": (grouped(2, 32), grouped(3, 32)),
        "int2 fp16-scales g64 / down 3-bit g64": (fp16_scales(2, 64), fp16_scales(3, 64)),
        "int2 2-bit down too (g32)": (grouped(2, 32), grouped(2, 32)),
        "int2 salient 1% (2-bit g32 / down 3-bit)": (salient(2, 32), salient(3, 32)),
    }
    params = sum(a.numel() + b.numel() for a, b in ref.values())
    rows = []
    print(f"{'candidate':<42} {'bits/w':>6} {'mean KL':>8}  per domain")
    for name, (fgu, fdn) in cands.items():
        out, nbytes = {}, 0
        for key, (gu, dn) in ref.items():
            a, b1 = fgu(gu, H[key]["gate_up"])
            c, b2 = fdn(dn, H[key]["down"])
            out[key], nbytes = (a, c), nbytes + b1 + b2
        publish(ev, out)
        dom = {d: ev._score(w, ev.ref_logp[d])["kl"] for d, w in ev.windows.items()}
        kl = sum(dom.values()) / len(dom)
        rows.append({"candidate": name, "bpw": 8 * nbytes / params, "kl": kl, "domains": dom})
        print(f"{name:<42} {8 * nbytes / params:>6.3f} {kl:>8.5f}  " + " ".join(f"{d} {v:.5f}" for d, v in dom.items()),
              flush=True)
    print(json.dumps({"bench": "quant_formats", "rows": rows, "total_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
