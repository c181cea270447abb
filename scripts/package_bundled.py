"""Package the trained model into dynaexq/bundled/<name>: HF checkpoint (bf16), tokenizer, eval and calibration
texts, and a model card whose numbers are measured here with plain transformers.

    python scripts/package_bundled.py --checkpoint build/train/checkpoint.pt --work build/train \
        --corpus build/corpus --out dynaexq/bundled/dxq-moe-mini
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_bundled import DOMAINS, make_config  # noqa: E402

TEXT_BYTES = {"eval": 120_000, "calibration": 64_000}
LETTER = {"code": "c", "prose": "p", "dict": "d"}


def cut(text: str, limit: int) -> str:
    """The first documents of the split, whole where possible, up to `limit` bytes."""
    if len(text.encode()) <= limit:
        return text
    head = text.encode()[:limit].decode("utf-8", "ignore")
    end = head.rfind("\n\n")
    return head[:end if end > limit // 2 else len(head)].rstrip() + "\n"


@torch.no_grad()
def measure(model, tok, texts: dict, windows: int = 16, length: int = 256) -> dict:
    """Validation PPL per domain and routed mass per (domain, layer, expert), on evenly spread windows."""
    cfg = model.config
    ppl, mass = {}, {}
    for d, text in texts.items():
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        starts = torch.linspace(0, len(ids) - length, windows).long()
        x = torch.stack([ids[s:s + length] for s in starts])
        out = model(input_ids=x, labels=x, output_router_logits=True)
        ppl[d] = math.exp(out.loss.item())
        m = []
        for logits in out.router_logits:  # [tokens, E] per layer
            p = logits.float().softmax(-1)
            w, idx = p.topk(cfg.num_experts_per_tok, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            m.append(torch.zeros(cfg.num_experts).index_add_(0, idx.reshape(-1), w.reshape(-1)))
        mass[d] = torch.stack(m)  # [L, E]
    return {"ppl": ppl, "mass": mass}


def gini(x: torch.Tensor) -> float:
    x = x.sort().values.double()
    n = len(x)
    return float((2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1).mul(x).sum() / (n * x.sum()))


def card(name: str, cfg, n_params: int, stats: dict, log: list, args) -> str:
    total = sum(stats["mass"].values())  # [L, E]
    L, E = total.shape
    rows = []
    for layer in range(L):
        p = total[layer] / total[layer].sum()
        ent = float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(E))
        top = float(p.sort(descending=True).values[:E // 8].sum())
        shares = torch.stack([stats["mass"][d][layer] for d in DOMAINS]) / total[layer].clamp_min(1e-12)  # [D, E]
        dom = shares.max(0)
        special = int((dom.values >= 0.6).sum())
        letters = "".join(LETTER[DOMAINS[i]] if v >= 0.6 else "." for v, i in zip(dom.values.tolist(), dom.indices.tolist()))
        rows.append(f"| {layer} | {ent:.3f} | {gini(total[layer]):.3f} | {top:.1%} | {float(p.min()):.2%} | "
                    f"{special}/{E} | `{letters}` |")
    last = log[-1] if log else {}
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---
# {name}

A small Mixture-of-Experts language model trained from scratch on this machine's CPU for dynaexq: it is the
default model of every `dynaexq` command, and its skewed, domain-specialized expert load is what makes
per-expert precision matter. It is a plain `Qwen3MoeForCausalLM` checkpoint:
`transformers.AutoModelForCausalLM.from_pretrained(path)` loads it as is.

It is a toy for measuring quantization policies, not an assistant: it continues Python code, technical prose
and dictionary entries; the chat template (`<|im_start|>role ... <|im_end|>`) exists so that chat endpoints
work, but the model was never trained on dialogue.

## Architecture
{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} attention heads
({cfg.num_key_value_heads} KV heads, head dim {cfg.head_dim}), **{cfg.num_experts} experts per layer, top-{cfg.num_experts_per_tok}**
(normalized), expert FFN {cfg.moe_intermediate_size}, vocabulary {cfg.vocab_size} (byte-level BPE, tied embeddings),
{n_params / 1e6:.1f} M parameters, stored in bfloat16.

## Training
`python scripts/build_corpus.py && python scripts/train_bundled.py --steps {args.steps} --seed 0` (the corpus
comes from Debian packages: see below). AdamW (betas 0.9/0.95, weight decay 0.1), peak learning rate 2e-3, linear
warm-up then cosine decay to 10 %, gradient clipping 1.0, batches of 4 random 256-token windows per domain per step,
a Switch-style load-balancing loss per MoE layer (coefficient 0.005; transformers' own pools all layers' tokens,
which let a first run leave whole experts unused), float32 on 2 CPU cores.
{last.get('step', '?')} steps, {args.tokens / 1e6:.1f} M tokens, {args.minutes:.0f} minutes. {args.note}

## Data (three domains)
| domain | source (Debian package) | license |
|---|---|---|
| code | Python 3.11 standard library source, `/usr/lib/python3.11` (libpython3.11-stdlib) | PSF License 2.0 |
| prose | Python 3.11 documentation sources (python3.11-doc), Perl pod (perl-doc), fortune cookies (fortunes) | PSF License 2.0; GPL-1+ or Artistic; BSD-style / public domain |
| dict | GNU Collaborative International Dictionary of English 0.48 (dict-gcide) | GPL-3+ |

Every source document (a file; for the dictionary a run of 100 entries) goes wholly to train (94 %), calibration
(3 %) or eval (3 %) by a hash of its name. `eval/*.txt` (held out, never trained on, never used for calibration)
and `calibration/*.txt` ship with the model, cut to about 120 KB and 64 KB per domain.

## Validation (eval/*.txt, 16 windows x 256 tokens per domain, bf16 weights, transformers forward)
| domain | perplexity |
|---|---|
""" + "\n".join(f"| {d} | {stats['ppl'][d]:.2f} |" for d in DOMAINS) + f"""

## Expert load and specialization (routed probability mass on all eval text)
Normalized entropy 1.0 = perfectly even load; Gini 0 = even. "Top 1/8" is the share of the mass taken by the
hottest {E // 8} of {E} experts (even: 12.5 %). An expert is *specialized* when at least 60 % of its mass comes from
one domain (c = code, p = prose, d = dict, . = mixed); with even use each domain gives about a third.

| layer | entropy | Gini | top 1/8 | coldest expert | specialized | experts 0..{E - 1} |
|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="build/train/checkpoint.pt")
    ap.add_argument("--work", default="build/train")
    ap.add_argument("--corpus", default="build/corpus")
    ap.add_argument("--out", default="dynaexq/bundled/dxq-moe-mini")
    ap.add_argument("--minutes", type=float, default=0.0, help="training wall time, for the card")
    ap.add_argument("--note", default="", help="a sentence about this run, for the card")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    work, out = Path(args.work), Path(args.out)
    tok = PreTrainedTokenizerFast.from_pretrained(work / "tokenizer")
    state = torch.load(args.checkpoint, weights_only=False)
    model = AutoModelForCausalLM.from_config(make_config(len(tok)), dtype=torch.float32)
    model.load_state_dict(state["model"])
    log = [json.loads(line) for line in open(work / "log.jsonl")]
    args.steps = state["step"]
    args.tokens = state["step"] * 4 * len(DOMAINS) * 256
    model = model.to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        texts = {}
        for sub, split in (("eval", "eval"), ("calibration", "calib")):
            (tmp / sub).mkdir()
            for d in DOMAINS:
                text = cut((Path(args.corpus) / d / f"{split}.txt").read_text(encoding="utf-8"), TEXT_BYTES[sub])
                (tmp / sub / f"{d}.txt").write_text(text, encoding="utf-8")
                if sub == "eval":
                    texts[d] = text
        stats = measure(AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval(), tok, texts)
        (tmp / "README.md").write_text(card(out.name, model.config, n_params, stats, log, args))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"packaged {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB); "
          f"ppl {stats['ppl']}")


if __name__ == "__main__":
    main()
