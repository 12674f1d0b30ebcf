"""The `janus-server` command: serve, api, worker, tiny-model, plan, batch. Every flag is also `JANUS_<FLAG>`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from server.settings import Settings


def _common(p: argparse.ArgumentParser, *, model: bool, network: bool, tracing: bool = True) -> None:
    p.add_argument("--queue", help="'memory' (default) or redis://host:6379/0")
    if model:
        p.add_argument("--model", help="checkpoint directory or hub id (transformers or DeepSeek layout)")
        p.add_argument("--device", help="auto | cpu | cuda[:N]")
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--max-batch-size", type=int, dest="max_batch_size",
                       help="images + understanding sequences running at once (does not size memory)")
        p.add_argument("--kv-cache-memory", dest="kv_cache_memory",
                       help="KV block pool size, e.g. 6GiB (default: from the GPU; 2 GiB at most on CPU)")
        p.add_argument("--gpu-memory-utilization", type=float, dest="gpu_memory_utilization",
                       help="CUDA: share of the device for weights + activations + KV (default 0.90)")
        p.add_argument("--compile", action="store_true", default=None, help="compile the decode step (CUDA)")
        p.add_argument("--cuda-graphs", action="store_true", default=None, dest="cuda_graphs",
                       help="capture the decode step as a CUDA graph per batch bucket at start-up, replayed each "
                            "step (compiled too with --compile)")
        p.add_argument("--quantization", choices=["none", "int8", "fp8"],
                       help="weights of the LM's linears and heads: int8 weight-only (CPU, CUDA) or fp8 (CUDA, "
                            "compute capability >= 8.9); quantized while loading (default: none)")
        p.add_argument("--vae", help="JanusFlow: the diffusers AutoencoderKL (directory or hub id); default: the "
                                     "checkpoint's vae/ directory if it has one, else stabilityai/sdxl-vae")
        p.add_argument("--chat-format", dest="chat_format", choices=["janus-pro", "janus"],
                       help="prompt roles: janus-pro (<|User|>) or janus (Janus-1.3B's User:); "
                            "default: the checkpoint's own template, else its family")
    if network:
        p.add_argument("--served-model-name", action="append", dest="served_model_name",
                       help="a name clients send as `model` (repeatable; default: --model as given, its last "
                            "path component accepted too)")
    if network:
        p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=None, dest="access_log",
                       help="one log line per request, refusals with their reason (default: on)")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--grpc-port", type=int, dest="grpc_port", help="0 disables gRPC")
        p.add_argument("--api-key", action="append", dest="api_key",
                       help="accepted API key (repeatable); visible to every user of this host in `ps`: prefer "
                            "JANUS_API_KEY or --api-keys-file")
        p.add_argument("--api-keys-file", dest="api_keys_file",
                       help="YAML or JSON file of named keys (sha256 of each) with quotas; reloaded on change")
        p.add_argument("--require-api-key", action="store_true", default=None, dest="require_api_key",
                       help="refuse to start without a key")
        for what, means in (("docs", "/openapi.json"), ("metrics", "/metrics"),
                            ("reflection", "gRPC server reflection")):
            p.add_argument(f"--open-{what}", action="store_true", default=None, dest=f"open_{what}",
                           help=f"serve {means} without a key when keys are set")
        p.add_argument("--max-queue-depth", type=int, dest="max_queue_depth")
        p.add_argument("--request-timeout", type=float, dest="request_timeout")
        p.add_argument("--playground", action=argparse.BooleanOptionalAction, default=None,
                       help="serve the browser playground at / and /playground (default: on)")
    p.add_argument("--metrics-port", type=int, dest="metrics_port")
    if tracing:
        p.add_argument("--otlp-traces-endpoint", dest="otlp_traces_endpoint", metavar="URL",
                       help="OpenTelemetry traces over OTLP/HTTP to this URL, e.g. http://collector:4318/v1/traces "
                            "(default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else off); needs "
                            "pip install 'janus-server[tracing]'")
    p.add_argument("--log-level", dest="log_level")
    p.add_argument("--log-json", action=argparse.BooleanOptionalAction, default=None, dest="log_json",
                   help="JSON log lines (default) or, with --no-log-json, plain text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus-server", description="Inference server for DeepSeek Janus-Pro")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="API + gRPC + worker(s) in one process tree")
    _common(serve, model=True, network=True)
    serve.add_argument("--workers", type=int,
                       help="worker processes (default: one per GPU on CUDA, else 1); several share a Redis "
                            "queue: --queue, or a private redis-server serve starts")
    serve.add_argument("--gpus", help="CUDA: the visible GPUs that get workers, e.g. 0,2,3 (default: all)")
    api = sub.add_parser("api", help="REST + gRPC frontends only (needs workers on a Redis queue)")
    _common(api, model=False, network=True)
    worker = sub.add_parser("worker", help="one engine pulling jobs from a Redis queue")
    _common(worker, model=True, network=False)
    tiny = sub.add_parser("tiny-model", help="write a tiny random checkpoint with its tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--format", choices=["hf", "deepseek"], help="hf (default) or deepseek; JanusFlow: deepseek only")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--shards", type=int, default=1)
    tiny.add_argument("--variant", choices=["janus-pro", "janus"], default="janus-pro",
                      help="janus: Janus-1.3B's User:/Assistant: roles (hf layout: in its chat template)")
    tiny.add_argument("--image-size", type=int, default=64, dest="image_size",
                      help="64 (default: 16 image tokens, fast) or 384 (Janus-Pro's 576 tokens and 384x384 PNGs)")
    tiny.add_argument("--sharp", action="store_true", help="larger LM weights: varied outputs that reach EOS")
    tiny.add_argument("--family", choices=["janus", "janusflow"], default="janus",
                      help="janusflow: a JanusFlow checkpoint (DeepSeek layout only) and a tiny random VAE in "
                           "OUT_DIR/vae (--variant and --shards do not apply)"),
    plan = sub.add_parser("plan", help="what fits on a GPU: reads config.json only (no weights)")
    plan.add_argument("--model", required=True, help="checkpoint directory or hub id in the local cache")
    plan.add_argument("--gpu-memory", action="append", dest="gpu_memory",
                      help="device size to plan for, e.g. 24GiB (repeatable; default 24, 40, 48 and 80 GiB)")
    plan.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.90, dest="gpu_memory_utilization")
    plan.add_argument("--quantization", choices=["none", "int8", "fp8"], default="none",
                      help="count the LM's linears and heads at one byte per weight (int8 or fp8)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    batch = sub.add_parser("batch", help="run an OpenAI batch file (JSONL) through a server (--url) or a model "
                                         "loaded here (--model); writes OpenAI's batch output file, resumably")
    batch.add_argument("input", help="OpenAI batch input: one {custom_id, method, url, body} per line")
    batch.add_argument("--output", required=True,
                       help="OpenAI batch output (JSONL); lines already in it are skipped (resume)")
    batch.add_argument("--url", help="a running server's root URL, e.g. http://host:8000 (instead of --model)")
    batch.add_argument("--images-dir", dest="images_dir",
                       help="write images to files here; the output names their path instead of base64")
    batch.add_argument("--concurrency", type=int,
                       help="requests in flight (default: 16 with --url, serve's --max-batch-size; 2 x "
                            "--max-batch-size with --model)")
    batch.add_argument("--api-key", dest="api_key",
                       help="--url: sent as Authorization: Bearer (default: JANUS_API_KEY's first key)")
    batch.add_argument("--timeout", type=float, default=600.0, help="--url: seconds for one request (default 600)")
    _common(batch, model=True, network=False, tracing=False)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    import json

    from janus_core import ModelLoadError, memory

    try:
        sizes = [memory.parse_size(s) for s in args.gpu_memory] if args.gpu_memory else list(memory.PLAN_MEMORIES)
        result = memory.plan(args.model, sizes, args.dtype, args.gpu_memory_utilization,
                             quantization=args.quantization)
    except (ModelLoadError, ValueError) as exc:
        print(f"janus-server plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    quantized = "" if args.quantization == "none" else f" with {args.quantization} linears"
    print(f"{args.model} in {args.dtype}{quantized}: weights {memory.format_size(result['weights_bytes'])}, "
          f"KV {memory.format_size(result['kv_bytes_per_token'])} per token, "
          f"{args.gpu_memory_utilization:.0%} of each device")
    print(f"{'GPU memory':>10} {'KV pool':>10} {'KV tokens':>10} {'images':>7} {'1k-token seqs':>14}")
    for p in result["plans"]:
        print(f"{memory.format_size(p['memory_bytes']):>10} {memory.format_size(p['kv_cache_bytes']):>10} "
              f"{p['kv_tokens']:>10} {p['concurrent_images']:>7} {p['concurrent_sequences']:>14}")
    print("images: 40-token prompts with CFG (two rows each), one at a time per request; "
          "sequences: 1,000 tokens of prompt and answer")
    return 0


def _write_tiny_flow(args: argparse.Namespace) -> int:
    from janus_core import ModelLoadError, write_tiny_flow_model

    if args.format not in (None, "deepseek"):
        print("janus-server tiny-model: JanusFlow checkpoints exist in DeepSeek's layout only (--format deepseek)",
              file=sys.stderr)
        return 2
    try:
        out = write_tiny_flow_model(args.out_dir, args.seed, image_size=args.image_size, sharp=args.sharp)
    except ModelLoadError as exc:  # diffusers missing
        print(f"janus-server tiny-model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a tiny random JanusFlow checkpoint (deepseek layout, seed {args.seed}, {args.image_size}x"
          f"{args.image_size} images) to {out}, and its tiny random VAE to {out / 'vae'}")
    return 0


def settings_from(args: argparse.Namespace) -> Settings:
    """Flags given on the command line win over `JANUS_*` environment variables."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in Settings.model_fields}
    return Settings(**given)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_keys(settings: Settings, args: argparse.Namespace) -> int | None:
    """Refuse to start on a broken keys file or, with --require-api-key, without a key; warn where the server
    listens beyond this host with no key, and where a key sits on the command line."""
    import logging

    from server.keys import InvalidKeysFile, KeyRing

    log = logging.getLogger("janus_server")
    try:
        keys = KeyRing.from_settings(settings)
    except InvalidKeysFile as exc:
        print(f"janus-server {args.command}: --api-keys-file: {exc}", file=sys.stderr)
        return 2
    if not keys.enabled:
        if settings.require_api_key:
            print(f"janus-server {args.command}: no API key is set and --require-api-key (JANUS_REQUIRE_API_KEY) "
                  "asks for one: set JANUS_API_KEY or --api-keys-file", file=sys.stderr)
            return 2
        if settings.host not in LOOPBACK:
            log.warning("listening on %s with no API key: anyone who reaches this port can use the model; "
                        "set JANUS_API_KEY or --api-keys-file (or --host 127.0.0.1)", settings.host)
    if getattr(args, "api_key", None):
        log.warning("--api-key puts the key on the command line, where any user of this host sees it (ps); "
                    "prefer JANUS_API_KEY or --api-keys-file")
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "tiny-model":
        from server.logs import quiet_libraries

        quiet_libraries()  # no "Writing model shards" progress bar
        from janus_core import write_tiny_model

        try:
            if args.family == "janusflow":
                return _write_tiny_flow(args)
            args.format = args.format or "hf"
            out = write_tiny_model(args.out_dir, args.format, args.seed, shards=args.shards, variant=args.variant,
                                   image_size=args.image_size, sharp=args.sharp)
        except ValueError as exc:
            print(f"janus-server tiny-model: {exc}", file=sys.stderr)
            return 2
        print(f"wrote a tiny random {args.variant} checkpoint ({args.format} layout, seed {args.seed}, "
              f"{args.image_size}x{args.image_size} images) to {out}")
        return 0
    if args.command == "plan":
        return run_plan(args)
    settings = settings_from(args)
    if args.command == "batch":
        from server.batch import command

        return command.main(args, settings)
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json, model_libraries=args.command != "api")
    from server import tracing

    try:
        tracing.configure(settings.otlp_traces_endpoint, role=args.command)
    except tracing.TracingUnavailable as exc:
        print(f"janus-server {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        return run_server(args, settings)
    finally:
        tracing.shutdown()  # what is still batched goes out before the process ends


def run_server(args: argparse.Namespace, settings: Settings) -> int:
    """`serve`, `api` or `worker`, until it stops."""
    from server import runtime

    if args.command in ("serve", "api") and (refused := check_keys(settings, args)) is not None:
        return refused
    if args.command == "serve":
        if not settings.model:
            print("janus-server serve: --model is required (or JANUS_MODEL)", file=sys.stderr)
            return 2
        return runtime.serve(settings)
    if args.command == "api":
        if settings.queue in ("", "memory", "memory://"):
            print("janus-server api: needs --queue redis://... (workers run elsewhere)", file=sys.stderr)
            return 2
        return asyncio.run(runtime.serve_api(settings, with_local_worker=False))
    if settings.queue in ("", "memory", "memory://"):
        print("janus-server worker: needs --queue redis://...", file=sys.stderr)
        return 2
    from janus_core import ModelLoadError
    from server.supervisor import CANNOT_LOAD, follow_parent

    follow_parent()
    try:
        return asyncio.run(runtime.serve_worker(settings))
    except ModelLoadError as exc:  # a restart cannot fix it: say so with a status serve recognises
        print(f"janus-server worker: cannot load the model: {exc}", file=sys.stderr)
        return CANNOT_LOAD


if __name__ == "__main__":
    sys.exit(main())
