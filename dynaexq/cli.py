"""The `dynaexq` command: prepare | generate | inspect.

User errors (UserError) print one paragraph on stderr and exit with code 2, like argparse's own
usage errors; nothing is left half-written because every file is written to a temporary name first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dynaexq.errors import UserError
from dynaexq.quant.precision import DEFAULT_GROUP_SIZE, DEFAULT_PRECISIONS


def _model_path(arg) -> Path:
    from dynaexq.demo import default_model
    from dynaexq.engine.load import cache_root

    return Path(arg) if arg else default_model(cache_root())


def cmd_prepare(args) -> int:
    from dynaexq.quant.precision import Precision
    from dynaexq.store.prepare import prepare

    t0 = time.perf_counter()
    out = prepare(args.checkpoint, args.out, Precision.parse_list(args.precisions), args.group_size)
    print(f"store ready at {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    import dynaexq
    from dynaexq.sizes import format_size

    engine = dynaexq.load(_model_path(args.model), policy=args.policy, expert_budget=args.expert_budget,
                          store=args.store)
    if engine.tokenizer is None:
        raise UserError(f"model {args.model!r} has no tokenizer files; generate needs one")
    streamer = TextStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    text = engine.generate(args.prompt, args.max_new_tokens, args.temperature, streamer=streamer, seed=args.seed)
    dt = time.perf_counter() - t0
    n = len(engine.tokenizer(text)["input_ids"])
    print(f"\n[{engine.policy}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s; experts resident "
          f"{format_size(engine.expert_bytes())} {engine.precision_counts()}]", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from dynaexq.store import inspect as store_inspect

    report = store_inspect.inspect(args.path)
    print(json.dumps(report, indent=1) if args.json else store_inspect.format_report(report))
    return 0 if report.get("integrity", "ok") == "ok" else 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynaexq", description="Mixture-of-Experts inference with per-expert "
                                "runtime precision under a memory budget")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="quantize every expert of a checkpoint at several precisions into a store")
    sp.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    sp.add_argument("--out", required=True, help="store directory to write")
    sp.add_argument("--precisions", default=",".join(p.value for p in DEFAULT_PRECISIONS),
                    help="comma-separated precisions (default: %(default)s)")
    sp.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help="quantization group along the input dim for <= 4 bits (default: %(default)s)")
    sp.set_defaults(fn=cmd_prepare)

    sg = sub.add_parser("generate", help="generate text, streaming tokens to the terminal")
    sg.add_argument("prompt")
    sg.add_argument("--model", help="checkpoint or store directory (default: the bundled model)")
    sg.add_argument("--store", help="use this store for --model (it must have been prepared from that checkpoint)")
    sg.add_argument("--policy", default="uniform:bf16", help="uniform:<precision> | map:<file.json> "
                    "(default: %(default)s)")
    sg.add_argument("--expert-budget", help="bytes for expert weights, e.g. 20GiB, 512MB, 123456")
    sg.add_argument("--max-new-tokens", type=int, default=64)
    sg.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sg.add_argument("--seed", type=int)
    sg.set_defaults(fn=cmd_generate)

    si = sub.add_parser("inspect", help="architecture, layers x experts, bytes per precision, store integrity")
    si.add_argument("path", help="store or checkpoint directory")
    si.add_argument("--json", action="store_true", help="print JSON instead of a table")
    si.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # we show our own bars; theirs would repeat for every load
    try:
        return args.fn(args)
    except UserError as err:
        print(f"dynaexq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynaexq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
