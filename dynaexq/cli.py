"""The `dynaexq` command: prepare | generate | eval | serve | lm-eval | inspect.

User errors (UserError) print one paragraph on stderr and exit with code 2, like argparse's own
usage errors; nothing is left half-written because every file is written to a temporary name first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

from dynaexq.cli_export import add_export_parser
from dynaexq.cli_serve import add_serve_parser
from dynaexq.cli_trace import add_trace_parser
from dynaexq.config import CALIBRATION_WINDOWS, EVAL_WINDOWS, POLICY, VERIFY, WINDOW_TOKENS
from dynaexq.errors import UserError
from dynaexq.quant.precision import DEFAULT_PRECISIONS


def _model_path(arg) -> Path:
    from dynaexq.demo import default_model

    return Path(arg) if arg else default_model()


def cmd_prepare(args) -> int:
    from dynaexq.engine.calibrate import prepare_store
    from dynaexq.quant.precision import Precision

    runner = None
    if args.ray is not None:
        from dynaexq.store.distributed import RayRunner
        runner = RayRunner(args.ray or None)
    t0 = time.perf_counter()
    out = prepare_store(args.checkpoint, args.out, Precision.parse_list(args.precisions), args.calibration,
                        args.calibration_windows, runner=runner)
    print(f"store ready at {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def _load_kwargs(args) -> dict:
    """dynaexq.load's keyword arguments from the flags generate and serve share."""
    return dict(policy=args.policy, expert_budget=args.expert_budget, store=args.store, calibration=args.calibration,
                runtime=_runtime_config(args), dtype=_dtype(args.dtype), verify=args.verify, dense=args.dense,
                threads=_threads(args), device=args.device, weight_budget=args.weight_budget,
                read_budget=args.read_budget)


def _runtime_config(args):
    from dynaexq.config import RuntimeConfig

    return _config(args, RuntimeConfig)


def _config(args, cls):
    """The `cls` config from the flags derived from it (None when none of its flags was given)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    return cls(**given) if given else None


def add_runtime_flags(parser, defaults=None) -> None:
    from dynaexq.config import RuntimeConfig

    add_config_flags(parser.add_argument_group("runtime policies (dynaexq, multilevel, frozen)"),
                     defaults or RuntimeConfig())


def add_config_flags(group, base) -> None:
    """One flag per field of the frozen config dataclass `base` (kebab-case), help and default from the field."""
    for f in fields(base):
        default = getattr(base, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            kind = type(default) if default is not None else (int if "int" in str(f.type) else str)
            shown = "" if "default" in f.metadata["help"] else f" (default: {default})"
            group.add_argument(flag, type=kind, default=None, help=f.metadata["help"] + shown)


def cmd_generate(args) -> int:
    import dynaexq
    from dynaexq.sizes import format_size

    engine = dynaexq.load(_model_path(args.model), **_load_kwargs(args))
    if args.record_routing:
        engine.record_routing(args.record_routing)
    try:
        if engine.tokenizer is None:
            raise UserError(f"model {args.model!r} has no tokenizer files; generate needs one")
        print(args.prompt, end="", flush=True)
        t0 = time.perf_counter()
        text = engine.generate(args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                               on_text=lambda delta: print(delta, end="", flush=True))
        dt = time.perf_counter() - t0
        print()
        n = len(engine.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        print(f"[{engine.policy}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s; weights resident "
              f"{format_size(engine.weight_bytes())}, of which experts {format_size(engine.expert_bytes())} "
              f"{engine.precision_counts()}]", file=sys.stderr)
        if engine.runtime is not None:
            s = engine.runtime.stats()
            t, off = s["transitions"], s.get("offload")
            if off is not None:
                print(f"[offload: {off.get('hits', 0)} hits, {off.get('misses', 0)} misses (hit rate "
                      f"{off['hit_rate']:.2f}), {format_size(off['io']['bytes'])} read from the store "
                      f"({off['io']['mode']}), stalled {off.get('stall_s', 0.0):.2f} s, {t['failures']} failed "
                      "reads]", file=sys.stderr)
            else:
                print(f"[runtime: {engine.runtime.controller.decisions} decisions, {t['pairs']} swaps decided, "
                      f"{t['promotions']} promotions, "
                      f"{format_size(t['bytes_moved'])} moved, {t['failures']} failed reads]", file=sys.stderr)
    finally:
        engine.close()
    return 0


def cmd_eval(args) -> int:
    from dynaexq.eval import harness, report

    _threads(args)
    if args.scenario:
        return _shift(args)
    if args.plot or args.repeats is not None:
        raise UserError("--plot and --repeats apply to the streamed --scenario runs only (--sweep always writes its "
                        "plot)")
    if args.sweep:
        if _runtime_config(args) is not None or args.step_tokens is not None:
            raise UserError("--sweep runs the static policies; runtime flags and --step-tokens apply to runtime "
                            "policies (eval --policy multilevel ..., or --scenario)")
        return _sweep(args)
    out = harness.evaluate(_model_path(args.model), args.data, args.policy, args.expert_budget, args.windows,
                           args.window_tokens, args.calibration, args.calibration_windows, progress=not args.json,
                           store=args.store, dtype=_dtype(args.dtype), verify=args.verify, dense=args.dense,
                           config=_runtime_config(args), step_tokens=args.step_tokens or harness.STEP_TOKENS,
                           device=args.device, weight_budgets=args.weight_budget, read_budget=args.read_budget,
                           record_routing=args.record_routing)
    print(report.table(out), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(out))
    return 0


def _add_dense(parser, what: str = "") -> None:
    parser.add_argument("--dense", default="model", choices=["model", "int8", "bf16"], help="non-expert linears "
                        "(attention, dense and shared-expert MLPs): model = transformers' own in --dtype; int8 = "
                        "per-row int8 codes, bf16 = bf16 weights, both on dynaexq's native CPU kernel (faster than "
                        "aten's on CPUs without bf16 matmul units); routers and the output head kept "
                        "(default: %(default)s)" + what)


def _dtype(name: str):
    import torch

    return None if name == "model" else getattr(torch, name)


def _sweep(args) -> int:
    from dynaexq.eval import harness, report
    from dynaexq.sizes import format_size

    model = _model_path(args.model)
    data = harness.parse_data(args.data, harness._model_dir(model))
    policies = args.policy or list(harness.HOTNESS_POLICIES)
    budgets = args.expert_budget or ["int2"]  # the sweep's own budgets start at all-int2
    args.store = harness.check_plans(model, [harness.parse_policy(p) for p in policies], budgets, args.store)
    ev = harness.Evaluation(model, data, args.windows, args.window_tokens, args.calibration, args.calibration_windows,
                            store=args.store, dtype=_dtype(args.dtype), verify=args.verify, dense=args.dense,
                            device=args.device, record_routing=args.record_routing)
    try:
        # resident bytes, as the planners count them (64-byte aligned tensors: more than the store's)
        budgets = ([harness.resolve_budget(b, ev.sized) for b in args.expert_budget] if args.expert_budget
                   else report.sweep_budgets(ev.sized))
        uniform = [f"uniform:{p.value}" for p in ev.reader.precisions if p.bits <= 8]
        runs = [(u, None) for u in uniform] + [(p, b) for p in policies for b in budgets]
        results = []
        for spec, b in runs:
            print(f"dynaexq eval --sweep: {spec} at {format_size(b) if b else 'its own size'}", file=sys.stderr)
            results.append(ev.run(spec, b))
        out = ev.report(results)
    finally:
        ev.close()
    outdir = Path(args.out or "eval-sweep")
    title = f"{Path(model).name}: {sum(w[0] for w in out['windows'].values())} windows x {args.window_tokens} tokens"
    report.plot(out, outdir / "sweep.png", title)
    md = (f"# Quality vs expert bytes: {Path(model).name}\n\nReference: {out['reference_policy']} "
          f"({format_size(out['reference_expert_bytes'])} of experts). Mean KL is over the domains "
          f"{', '.join(out['reference'])}.\n\n![sweep](sweep.png)\n\n{report.table(out, markdown=True)}\n")
    report.atomic_save(outdir / "sweep.md", lambda tmp: Path(tmp).write_text(md))
    report.atomic_save(outdir / "sweep.json", lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1)))
    print(report.table(out), file=sys.stderr if args.json else sys.stdout)
    print(f"wrote {outdir / 'sweep.png'}, {outdir / 'sweep.md'}, {outdir / 'sweep.json'}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


def _shift(args) -> int:
    from dynaexq.eval import shift
    from dynaexq.config import RuntimeConfig

    if args.sweep:
        raise UserError(f"--sweep and --scenario {args.scenario} are separate runs; give one of them")
    config = _runtime_config(args) or RuntimeConfig()
    out = shift.evaluate_shift(_model_path(args.model), args.data, args.policy, args.expert_budget, args.windows,
                               args.window_tokens, args.calibration, args.calibration_windows, args.repeats,
                               args.step_tokens or 32, config, progress=not args.json, store=args.store,
                               dtype=_dtype(args.dtype), verify=args.verify, scenario=args.scenario,
                               dense=args.dense, device=args.device, record_routing=args.record_routing)
    print(shift.table(out["results"]), file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        paths = shift.write_outputs(out, Path(args.out or f"eval-{args.scenario}"))
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_lm_eval(args) -> int:
    import dynaexq
    from dynaexq.eval import lm_eval_adapter

    engine = dynaexq.load(_model_path(args.model), policy=args.policy, expert_budget=args.expert_budget,
                          store=args.store, calibration=args.calibration, verify=args.verify, threads=_threads(args),
                          device=args.device, runtime=_runtime_config(args))
    try:  # closing stops the runtime and saves --hotness-file
        results = lm_eval_adapter.run(engine, args.tasks, args.include_path, args.limit, args.batch_size,
                                      args.num_fewshot)
        runtime = None
        if engine.runtime is not None:
            s = engine.runtime.stats()
            runtime = {"steps": s["steps"], "decisions": s["decisions"], "transitions": s["transitions"]["pairs"]}
        expert_bytes = engine.expert_bytes()
    finally:
        engine.close()
    from lm_eval.utils import make_table

    print(make_table(results), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"policy": engine.policy, "expert_bytes": expert_bytes, "runtime": runtime,
                          "results": results["results"]}, default=str))
    return 0


def cmd_inspect(args) -> int:
    from dynaexq.store import inspect as store_inspect

    report = store_inspect.inspect(args.path, args.verify)
    print(json.dumps(report, indent=1) if args.json else store_inspect.format_report(report))
    return 0 if report.get("integrity", "ok").startswith(("ok", "stamps ok")) else 2


def _add_weight_budget(parser, many: bool = False) -> None:
    kw = dict(nargs="+", action="extend", metavar="SIZE|FILE.gguf") if many else {"metavar": "SIZE|FILE.gguf"}
    parser.add_argument("--weight-budget", **kw, help="bytes for every weight tensor, e.g. 17GiB, or a llama.cpp "
                        "FILE.gguf (the bytes of its tensors): the non-expert matrices (attention, shared experts, "
                        "head, embedding) and the experts are planned in one budget; instead of --expert-budget and "
                        "--dense")
    parser.add_argument("--read-budget", metavar="SIZE|FILE.gguf|none", help="with --weight-budget (or --budget): the "
                        "bytes one decode token may read of every weight (batch-1 decode speed is bound by them), or "
                        "a FILE.gguf (what a token reads of that file); the plan then trades precision where every "
                        "token reads (attention, head) for precision where only the routed tokens do (experts). "
                        "Default: a FILE.gguf --weight-budget's own reads (as large and as fast as that file), else no "
                        "cap (the error-optimal plan); 'none': no cap")


def _add_record_routing(parser) -> None:
    parser.add_argument("--record-routing", metavar="FILE.npz", help="record every token's routing (expert ids and "
                        "gate weights per MoE layer, by sequence) into this routing trace, written at exit; replay it "
                        "with `dynaexq trace replay`")


def _add_device(parser) -> None:
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda[:N] (default: %(default)s)")


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=int, help="CPU cores a forward step computes on (default: torch's count, "
                        "the machine's physical cores)")


def _threads(args) -> int | None:
    """Apply --threads to this (the main) thread too: eval and prepare run their forwards here."""
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    return args.threads


def _add_model(parser) -> None:
    """--model, --store, --verify, --threads, --device: what every command that loads a model takes."""
    parser.add_argument("--model", help="checkpoint or store directory (default: the bundled model)")
    parser.add_argument("--store", help="use this store for --model (it must have been prepared from that "
                        "checkpoint)")
    _add_verify(parser)
    _add_threads(parser)
    _add_device(parser)


def _add_verify(parser) -> None:
    parser.add_argument("--verify", default=VERIFY, choices=["lazy", "full", "off"], help="store integrity at load: "
                        "lazy = shard sizes and sampled hashes now, each expert's digest on its first read; full = "
                        "sha256 of every shard now (slow on big stores); off (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynaexq", description="Mixture-of-Experts inference with per-expert "
                                "runtime precision under a memory budget")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="quantize every expert of a checkpoint at several precisions into a store")
    sp.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    sp.add_argument("--out", required=True, help="store directory to write")
    sp.add_argument("--precisions", default=",".join(p.value for p in DEFAULT_PRECISIONS),
                    help="comma-separated precisions (default: %(default)s)")
    sp.add_argument("--calibration", nargs="+", action="extend", metavar="[NAME=]FILE", help="text whose tokens "
                    "each expert is quantized against (GPTQ on the inputs routed to it; default: the model's "
                    "calibration/*.txt, else dynaexq's own corpus; 'none': weight error only)")
    sp.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS, help=f"windows of "
                    f"{WINDOW_TOKENS} tokens of calibration text, run in one forward pass (default: %(default)s)")
    sp.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="quantize the experts as Ray tasks on the "
                    "cluster at ADDRESS (no address: a local cluster of this machine's CPUs); the store is the same")
    sp.set_defaults(fn=cmd_prepare)

    sg = sub.add_parser("generate", help="generate text, streaming tokens to the terminal")
    sg.add_argument("prompt")
    _add_model(sg)
    sg.add_argument("--policy", default=POLICY, help="auto (fit this machine: the checkpoint's own precision when "
                    "everything fits the memory available, else the multilevel runtime within it; --budget / "
                    "--expert-budget replace the machine's figure) | uniform:<precision> | map:<file.json> | calibrated"
                    "[:hi=int8,lo=int2] | calibrated-multilevel | runtime policies: dynaexq[:hi=int8,lo=int2,"
                    "delta=0.01,alloc=proportional|depth] | multilevel | frozen (default: %(default)s)")
    sg.add_argument("--expert-budget", help="bytes for expert weights, e.g. 20GiB, 512MB, 123456, or a precision "
                    "name (int3 = the bytes of every expert at int3)")
    _add_weight_budget(sg)
    _add_record_routing(sg)
    sg.add_argument("--calibration", nargs="+", action="extend", metavar="[NAME=]FILE", help="calibration texts for "
                    "the calibrated policies (default: the model's calibration/*.txt)")
    add_runtime_flags(sg)
    sg.add_argument("--max-new-tokens", type=int, default=64)
    sg.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sg.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s = off)")
    sg.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default: 0 = off)")
    sg.add_argument("--seed", type=int, help="the same seed gives the same text here and from `dynaexq serve`")
    sg.add_argument("--dtype", default="model", choices=["model", "float32", "bfloat16", "float16"],
                    help="dtype of the non-expert weights and activations (default: %(default)s = the checkpoint's "
                    "own); expert kernels keep theirs")
    _add_dense(sg)
    sg.set_defaults(fn=cmd_generate)

    se = sub.add_parser("eval", help="quality of precision policies at equal expert bytes vs the full-precision model",
                        description="Per domain: perplexity, mean KL(reference || policy) per token and top-1 "
                        "agreement with the reference (the checkpoint at its own dtype), plus the expert bytes "
                        "actually resident. Hotness policies (calibrated, calibrated-multilevel, oracle) are run at "
                        "every --expert-budget.")
    _add_model(se)
    se.add_argument("--data", nargs="+", action="extend", metavar="NAME=FILE", help="UTF-8 text files to evaluate on "
                    "(default: the model's eval/*.txt)")
    se.add_argument("--policy", nargs="+", action="extend", metavar="SPEC", help="policies (default: uniform "
                    "int8/int4/int3/int2, plus calibrated, calibrated-multilevel and oracle when a budget is given)")
    se.add_argument("--expert-budget", nargs="+", action="extend", metavar="SIZE", help="expert budgets: sizes "
                    "(20MiB) or precision names (int3 = the bytes of every expert at int3)")
    _add_weight_budget(se, many=True)
    se.add_argument("--calibration", nargs="+", action="extend", metavar="[NAME=]FILE", help="calibration texts for "
                    "the calibrated "
                    "policies (default: the model's calibration/*.txt, never its eval texts)")
    se.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS, help="windows of --window-tokens "
                    "read from the calibration texts (default: %(default)s)")
    se.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="windows per domain (default: %(default)s)")
    se.add_argument("--window-tokens", type=int, default=WINDOW_TOKENS, help="tokens per window (default: %(default)s)")
    se.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "model"],
                    help="compute dtype of the non-expert weights and activations (default: %(default)s; 'model' = "
                    "the checkpoint's own); expert kernels keep theirs")
    _add_dense(se, "; the reference keeps them in --dtype, so the KL includes their cost")
    se.add_argument("--sweep", action="store_true", help="run the hotness policies over a range of budgets (or the "
                    "given ones) plus every uniform precision; write sweep.png, sweep.md and sweep.json to --out")
    se.add_argument("--out", help="directory for --sweep output (default: eval-sweep) and --plot output (default: "
                    "eval-SCENARIO)")
    se.add_argument("--scenario", choices=["shift", "mismatch", "cold", "steady"], help="stream windows in steps "
                    "with the runtime's controller live, KL per phase: shift = the --data domains in phases (code -> "
                    "prose -> dict, --repeats times); mismatch / cold / steady = the first --data domain in --repeats "
                    "blocks, the runtime warm-started from another domain's calibration text / not at all / from all "
                    "of them. Policies may name a warm start (SPEC@NAME, SPEC@none); phase-oracle = the static map "
                    "picked from each phase's own routing. Budget: --expert-budget (default int3)")
    se.add_argument("--repeats", type=int, help="scenarios: blocks of each domain (default: 2 for shift, else 4)")
    se.add_argument("--step-tokens", type=int, help="runtime policies and scenarios: tokens per streamed forward step, "
                    "the controller stepping after each (default: 32)")
    se.add_argument("--plot", action="store_true", help="scenarios: write SCENARIO.png (KL vs tokens streamed), "
                    ".md and .json to --out")
    add_runtime_flags(se)
    se.add_argument("--record-routing", metavar="FILE.npz", help="record the routing of the reference pass (the "
                    "model at its own precision over every eval window, one sequence per window) into this routing "
                    "trace; replay it with `dynaexq trace replay`")
    se.add_argument("--json", action="store_true", help="print the report as one JSON object on the last stdout line")
    se.set_defaults(fn=cmd_eval)

    sl = sub.add_parser("lm-eval", help="run lm-eval tasks on the model at a policy (needs the `eval` extra)")
    sl.add_argument("tasks", nargs="+", help="lm-eval task names (its own, or from --include-path)")
    sl.add_argument("--include-path", nargs="+", action="extend", metavar="DIR", help="directories of task YAML files")
    _add_model(sl)
    sl.add_argument("--policy", default=POLICY, help="precision policy, as for generate (default: %(default)s)")
    sl.add_argument("--expert-budget", help="bytes for expert weights or a precision name")
    sl.add_argument("--calibration", nargs="+", action="extend", metavar="[NAME=]FILE",
                    help="calibration texts for calibrated policies")
    sl.add_argument("--limit", type=int, help="at most this many documents per task")
    sl.add_argument("--num-fewshot", type=int)
    sl.add_argument("--batch-size", type=int, default=8)
    sl.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    add_runtime_flags(sl)
    sl.set_defaults(fn=cmd_lm_eval)

    add_serve_parser(sub)

    add_trace_parser(sub)
    add_export_parser(sub)

    si = sub.add_parser("inspect", help="architecture, layers x experts, bytes per precision, store integrity")
    si.add_argument("path", help="store or checkpoint directory")
    si.add_argument("--verify", action="store_true", help="hash every shard of a store against its manifest "
                    "(sha256; without it: sizes and sampled hashes)")
    si.add_argument("--json", action="store_true", help="print JSON instead of a table")
    si.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # we show our own bars; theirs would repeat for every load
    try:
        if getattr(args, "device", None) is not None:
            from dynaexq.engine.load import check_device
            check_device(args.device)  # before any work: a missing GPU is not found after the reference pass
        return args.fn(args)
    except UserError as err:
        print(f"dynaexq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynaexq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
