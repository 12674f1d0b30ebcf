"""The `janus-server` command: serve, api, worker, tiny-model. Every flag is also `JANUS_<FLAG>`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from server.settings import Settings


def _common(p: argparse.ArgumentParser, *, model: bool, network: bool) -> None:
    p.add_argument("--queue", help="'memory' (default) or redis://host:6379/0")
    if model:
        p.add_argument("--model", help="checkpoint directory or hub id (transformers or DeepSeek layout)")
        p.add_argument("--device", help="auto | cpu | cuda[:N]")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--max-batch-size", type=int, dest="max_batch_size")
        p.add_argument("--compile", action="store_true", default=None, help="compile the decode step (CUDA)")
        p.add_argument("--chat-format", dest="chat_format", choices=["janus-pro", "janus"],
                       help="prompt roles: janus-pro (<|User|>) or janus (Janus-1.3B's User:); "
                            "default: the checkpoint's own template, else its family")
    if network:
        p.add_argument("--served-model-name", action="append", dest="served_model_name",
                       help="a name clients send as `model` (repeatable; default: the checkpoint's name)")
    if network:
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--grpc-port", type=int, dest="grpc_port", help="0 disables gRPC")
        p.add_argument("--api-key", action="append", dest="api_key", help="accepted API key (repeatable)")
        p.add_argument("--max-queue-depth", type=int, dest="max_queue_depth")
        p.add_argument("--request-timeout", type=float, dest="request_timeout")
        p.add_argument("--playground", action=argparse.BooleanOptionalAction, default=None,
                       help="serve the browser playground at / and /playground (default: on)")
    p.add_argument("--metrics-port", type=int, dest="metrics_port")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None, dest="log_json",
                   help="JSON log lines (default) or, with --no-log-json, plain text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus-server", description="Inference server for DeepSeek Janus-Pro")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="API + gRPC + worker(s) in one process tree")
    _common(serve, model=True, network=True)
    serve.add_argument("--workers", type=int, help="worker processes (Redis queue only)")
    api = sub.add_parser("api", help="REST + gRPC frontends only (needs workers on a Redis queue)")
    _common(api, model=False, network=True)
    worker = sub.add_parser("worker", help="one engine pulling jobs from a Redis queue")
    _common(worker, model=True, network=False)
    tiny = sub.add_parser("tiny-model", help="write a tiny random checkpoint with its tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--format", choices=["hf", "deepseek"], default="hf")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shards", type=int, default=1)
    tiny.add_argument("--variant", choices=["janus-pro", "janus"], default="janus-pro",
                      help="janus: Janus-1.3B's User:/Assistant: roles (hf layout: in its chat template)")
    tiny.add_argument("--image-size", type=int, default=64, dest="image_size",
                      help="64 (default: 16 image tokens, fast) or 384 (Janus-Pro's 576 tokens and 384x384 PNGs)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over `JANUS_*` environment variables."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**given)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        from server.logs import quiet_libraries

        quiet_libraries()  # no "Writing model shards" progress bar
        from janus_core.tiny import write_tiny_model

        try:
            out = write_tiny_model(args.out_dir, args.format, args.seed, shards=args.shards, variant=args.variant,
                                   image_size=args.image_size)
        except ValueError as exc:
            print(f"janus-server tiny-model: {exc}", file=sys.stderr)
            return 2
        print(f"wrote a tiny random {args.variant} checkpoint ({args.format} layout, seed {args.seed}, "
              f"{args.image_size}x{args.image_size} images) to {out}")
        return 0
    settings = settings_from(args)
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    from server import runtime

    if args.command == "serve":
        local = settings.queue in ("", "memory", "memory://")
        if not settings.model:
            print("janus-server serve: --model is required (or JANUS_MODEL)", file=sys.stderr)
            return 2
        return asyncio.run(runtime.serve_api(settings, with_local_worker=local, spawn_workers_here=not local))
    if args.command == "api":
        if settings.queue in ("", "memory", "memory://"):
            print("janus-server api: needs --queue redis://... (workers run elsewhere)", file=sys.stderr)
            return 2
        return asyncio.run(runtime.serve_api(settings, with_local_worker=False))
    if settings.queue in ("", "memory", "memory://"):
        print("janus-server worker: needs --queue redis://...", file=sys.stderr)
        return 2
    return asyncio.run(runtime.serve_worker(settings))


if __name__ == "__main__":
    sys.exit(main())
