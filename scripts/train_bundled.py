"""Train the bundled MoE model (Qwen3-MoE architecture) on the three-domain corpus, on CPU.

    python scripts/build_corpus.py --out build/corpus
    python scripts/train_bundled.py --corpus build/corpus --work build/train --out dynaexq/bundled/dxq-moe-mini \
        --steps 5000 --seed 0

Byte-level BPE tokenizer (8192 tokens) trained on the train split; every step draws the same number of random
256-token windows from each domain; AdamW, linear warm-up then cosine decay to 10 %; a Switch-style
load-balancing loss per MoE layer (E * sum_e f_e * P_e, mean over layers, coefficient 0.005) keeps experts alive
while the load stays skewed (transformers' own aux loss pools the tokens of all layers, so one layer's imbalance
can hide behind another's: with it at Qwen3's 0.001 a first run left whole experts unused). A
checkpoint is written to --work every 500 steps and a killed run resumes from it. The final weights are saved in
bfloat16 as a plain Hugging Face checkpoint with its tokenizer. Progress goes to --work/log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

DOMAINS = ("code", "prose", "dict")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
AUX_COEF = 0.005
TOKENIZE_CAP = 16_000_000  # characters of train text per domain that are tokenized


def train_tokenizer(corpus: Path, vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sample():
        for d in DOMAINS:
            text = (corpus / d / "train.txt").read_text(encoding="utf-8")[:4_000_000]
            for i in range(0, len(text), 10_000):
                yield text[i:i + 10_000]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def encode(tok, path: Path, cache: Path) -> np.ndarray:
    if cache.exists():
        return np.load(cache)
    text = path.read_text(encoding="utf-8")[:TOKENIZE_CAP]
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16)
                          for e in tok.backend_tokenizer.encode_batch(chunks, add_special_tokens=False)])
    np.save(cache, ids)
    return ids


def make_config(vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=1024,
        router_aux_loss_coef=AUX_COEF, output_router_logits=False, tie_word_embeddings=True,
        eos_token_id=0, pad_token_id=0, bos_token_id=None, rope_theta=10000.0)


def windows(data: np.ndarray, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(data) - length - 1, size=n)
    return torch.from_numpy(np.stack([data[s:s + length + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def validation(model, evals: dict, length: int, n: int = 8) -> dict:
    model.eval()
    out = {}
    for d, data in evals.items():
        x = torch.from_numpy(np.stack([data[i * length:(i + 1) * length + 1] for i in range(n)]).astype(np.int64))
        out[d] = math.exp(model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss.item())
    model.train()
    return out


def balance_loss(router_logits, k: int) -> torch.Tensor:
    """Mean over MoE layers of E * sum_e f_e * P_e (f: share of top-k slots, P: mean router probability); 1 when
    the load is even."""
    losses = []
    for logits in router_logits:  # [tokens, E] per layer
        p = logits.float().softmax(-1)
        f = torch.zeros_like(p).scatter_(1, p.topk(k, dim=-1).indices, 1.0).mean(0) / k
        losses.append(p.shape[-1] * (f * p.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main():
    ap = argparse.ArgumentParser(description="train the bundled MoE model")
    ap.add_argument("--corpus", default="build/corpus")
    ap.add_argument("--work", default="build/train")
    ap.add_argument("--out", default="dynaexq/bundled/dxq-moe-mini")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--per-domain", type=int, default=4, help="sequences per domain per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", type=int, default=0, help="time this many steps and exit")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    corpus, work = Path(args.corpus), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    tok = (PreTrainedTokenizerFast.from_pretrained(tok_dir) if (tok_dir / "tokenizer.json").exists()
           else train_tokenizer(corpus, 8192, tok_dir))
    train = {d: encode(tok, corpus / d / "train.txt", work / f"{d}.train.npy") for d in DOMAINS}
    evals = {d: encode(tok, corpus / d / "eval.txt", work / f"{d}.eval.npy") for d in DOMAINS}
    print({d: len(v) for d, v in train.items()}, flush=True)

    torch.manual_seed(args.seed)
    config = make_config(len(tok))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.output_router_logits = True  # router logits out (transformers' pooled aux loss: weight 0)
    model.config.router_aux_loss_coef = 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(args.seed)
    step, ckpt = 0, work / "checkpoint.pt"
    if ckpt.exists() and not args.bench:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f}M parameters", flush=True)
    log = open(work / "log.jsonl", "a")
    model.train()
    t0, tokens = time.perf_counter(), 0
    steps = args.bench or args.steps
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = torch.cat([windows(train[d], args.per_domain, args.seq, rng) for d in DOMAINS])
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())
        aux = balance_loss(out.router_logits, config.num_experts_per_tok)
        (out.loss + AUX_COEF * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x[:, :-1].numel()
        if args.bench:
            continue
        if step % 25 == 0:
            rec = {"step": step, "loss": round(out.loss.item(), 4), "aux": round(aux.item(), 4),
                   "lr": opt.param_groups[0]["lr"], "tok_s": round(tokens / (time.perf_counter() - t0))}
            if step % 250 == 0 or step == steps:
                rec["val_ppl"] = validation(model, evals, args.seq)
            print(json.dumps(rec), file=log, flush=True)
            print(json.dumps(rec), flush=True)
        if step % 500 == 0 or step == steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                        "step": step}, work / "checkpoint.tmp")
            (work / "checkpoint.tmp").rename(ckpt)
    if args.bench:
        dt = time.perf_counter() - t0
        print(f"{args.bench} steps: {dt / args.bench:.2f} s/step, {tokens / dt:.0f} tok/s")
        return
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = AUX_COEF
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
