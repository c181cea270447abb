"""`dynaexq serve`: the OpenAI-compatible server of one engine (serve/app.py), or --replicas of it on Ray Serve
(serve/replicas.py)."""
from __future__ import annotations

import dataclasses
import sys

from dynaexq.config import POLICY, RuntimeConfig, ServeConfig
from dynaexq.errors import UserError


def cmd_serve(args) -> int:
    import uvicorn

    import dynaexq
    from dynaexq.cli import _config, _load_kwargs, _model_path
    from dynaexq.serve.app import create_app

    config = _config(args, ServeConfig) or ServeConfig()
    if args.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"dynaexq: warning: serving on {args.host} without --api-key: anyone who can reach this address can "
              "use the server", file=sys.stderr)
    if args.ray is None and args.replicas != 1:
        raise UserError(f"--replicas {args.replicas} needs --ray [ADDRESS] (replicas run on a Ray cluster); without "
                        "it one server runs here")
    if args.ray is not None:  # replicas on Ray Serve (serve/replicas.py)
        if args.record_routing:
            raise UserError("--record-routing records one engine's routing; it is not available with --ray")
        from dynaexq.serve.replicas import run
        kw = _load_kwargs(args)
        hot = kw["runtime"].hotness_file if kw["runtime"] else None  # the driver's: it seeds and saves the merge
        if hot:
            kw["runtime"] = dataclasses.replace(kw["runtime"], hotness_file=None)
            kw["runtime"] = None if kw["runtime"] == RuntimeConfig() else kw["runtime"]
        return run(args.ray or None, _model_path(args.model), kw, config, args.replicas, args.host, args.port, hot)
    engine = dynaexq.load(_model_path(args.model), **_load_kwargs(args))
    if args.record_routing:
        engine.record_routing(args.record_routing)
    try:
        app = create_app(engine, config)
    except BaseException:
        engine.close()
        raise
    server = app.state.server
    print(f"dynaexq: serving {server.model_name} ({engine.policy}, max batch {server.scheduler.max_batch}, context "
          f"{server.context}) at http://{args.host}:{args.port}/v1 (dashboard /dashboard, metrics /metrics)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)  # its shutdown closes the engine
    return 0


def add_serve_parser(sub) -> None:
    from dynaexq.cli import (_add_dense, _add_model, _add_record_routing, _add_weight_budget, add_config_flags,
                             add_runtime_flags)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, completions, models) with "
                        "continuous batching, Prometheus metrics and a live expert dashboard")
    _add_model(sv)
    sv.add_argument("--policy", default=POLICY, help="precision policy, as for generate; the runtime "
                    "policies (dynaexq, multilevel) learn from the served traffic (default: %(default)s)")
    sv.add_argument("--expert-budget", help="bytes for expert weights, e.g. 20GiB, or a precision name (int3)")
    _add_weight_budget(sv)
    _add_record_routing(sv)
    sv.add_argument("--calibration", nargs="+", action="extend", metavar="[NAME=]FILE",
                    help="calibration texts for the hotness policies")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    sv.add_argument("--dtype", default="model", choices=["model", "float32", "bfloat16", "float16"],
                    help="dtype of the non-expert weights and activations (default: %(default)s = the checkpoint's "
                    "own); float32 batches ~4x faster on CPUs without native bf16 (no AVX512-BF16/AMX) at twice "
                    "the non-expert bytes; expert kernels keep theirs")
    _add_dense(sv)
    sv.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="serve --replicas engines on the Ray "
                    "cluster at ADDRESS (none: a local one) behind Ray Serve's proxy; needs dynaexq[ray]")
    sv.add_argument("--replicas", type=int, default=1, help="with --ray: engines, each with its own budget and "
                    "--threads CPUs (default: %(default)s)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default: %(default)s)")
    add_config_flags(sv.add_argument_group("server"), ServeConfig())
    add_runtime_flags(sv)
    sv.set_defaults(fn=cmd_serve)
