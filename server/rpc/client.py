"""A small typed, synchronous Python client for janus-server's gRPC API (`janus.v1.Janus`).

    from server.rpc.client import JanusClient

    with JanusClient("localhost:50051", api_key=None) as client:
        answer = client.understand("What is in this image?", ["cat.png"])
        print(answer.text)
        images = client.generate("a red fox in the snow", n=2, seed=7)
        open("fox.png", "wb").write(images.pngs[0])

Parameters left as None take the server's defaults. Failures raise `grpc.RpcError` (`.code()`,
`.details()`) like any gRPC stub. Breaking out of a stream cancels the request on the server.
Also a command line: `python -m server.rpc.client --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Union

import grpc

from server.rpc.gen.janus.v1 import janus_pb2, janus_pb2_grpc

ImageInput = Union[bytes, str, "os.PathLike[str]"]  # encoded image bytes, or a path to read


@dataclass(frozen=True)
class Understanding:
    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class TextChunk:
    id: str
    delta: str
    finish_reason: str  # empty until the last chunk
    prompt_tokens: int  # set on the last chunk
    completion_tokens: int  # set on the last chunk


@dataclass(frozen=True)
class Images:
    id: str
    seed: int
    pngs: list[bytes]


@dataclass(frozen=True)
class Progress:
    step: int
    total: int


@dataclass(frozen=True)
class Preview:
    """Image `index` as it looks after `step` steps (`generate_stream(previews=k)`), a PNG."""

    index: int
    step: int
    png: bytes


def _read_image(image: ImageInput) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _set(fields: dict[str, Any], **values: Any) -> dict[str, Any]:
    """`fields` plus the `values` that are not None (None means: leave unset, server default)."""
    return fields | {k: v for k, v in values.items() if v is not None}


def _images(result: janus_pb2.GenerateResponse) -> Images:
    return Images(id=result.id, seed=result.seed, pngs=list(result.png))


class JanusClient:
    """One channel to a janus-server; safe to share between threads."""

    def __init__(self, target: str = "localhost:50051", api_key: str | None = None, *,
                 timeout: float | None = None, tls: bool = False, root_certificates: bytes | None = None,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),  # n=16 PNGs exceed the 4 MiB default
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a long generation
        ]
        if tls:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = janus_pb2_grpc.JanusStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> JanusClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self._timeout if timeout is None else timeout, "metadata": self._metadata}

    # --- understanding ---

    def understand(self, prompt: str, images: Sequence[ImageInput], *, max_new_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                   timeout: float | None = None) -> Understanding:
        request = self._understand_request(prompt, images, max_new_tokens, temperature, top_p, seed)
        r = self._stub.Understand(request, **self._options(timeout))
        return Understanding(id=r.id, text=r.text, finish_reason=r.finish_reason,
                             prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)

    def converse(self, messages: Sequence[dict[str, Any]], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 timeout: float | None = None) -> Understanding:
        """Continue a conversation: `messages` are `{"role", "text", "images": [paths or bytes]}`, oldest first."""
        turns = [janus_pb2.Message(role=m["role"], text=m.get("text", ""),
                                   images=[_read_image(i) for i in m.get("images", ())]) for m in messages]
        fields = _set({"messages": turns}, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      seed=seed)
        r = self._stub.Understand(janus_pb2.UnderstandRequest(**fields), **self._options(timeout))
        return Understanding(id=r.id, text=r.text, finish_reason=r.finish_reason,
                             prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)

    def understand_stream(self, prompt: str, images: Sequence[ImageInput], *,
                          max_new_tokens: int | None = None, temperature: float | None = None,
                          top_p: float | None = None, seed: int | None = None,
                          timeout: float | None = None) -> Iterator[TextChunk]:
        request = self._understand_request(prompt, images, max_new_tokens, temperature, top_p, seed)
        call = self._stub.UnderstandStream(request, **self._options(timeout))
        try:
            for c in call:
                yield TextChunk(id=c.id, delta=c.delta, finish_reason=c.finish_reason,
                                prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
        finally:
            call.cancel()  # no-op once finished; cancels the job if the caller stopped early

    # --- generation ---

    def generate(self, prompt: str, *, n: int | None = None, cfg_weight: float | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 steps: int | None = None, timeout: float | None = None) -> Images:
        """`temperature=0` is greedy; None is the server default (1.0). `steps`: flow models (JanusFlow) only."""
        request = self._generate_request(prompt, n, cfg_weight, temperature, top_p, seed, steps)
        return _images(self._stub.Generate(request, **self._options(timeout)))

    def generate_stream(self, prompt: str, *, n: int | None = None, cfg_weight: float | None = None,
                        temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                        steps: int | None = None, timeout: float | None = None,
                        previews: int = 0) -> Iterator[Progress | Preview | Images]:
        """`Progress` per decoded image token (flow models: per ODE step), with `previews` (0-8) a `Preview` of
        each image at that many evenly spaced steps (fewer when the server's preview decoder is busy), then one
        `Images`."""
        request = self._generate_request(prompt, n, cfg_weight, temperature, top_p, seed, steps)
        request.previews = previews
        call = self._stub.GenerateStream(request, **self._options(timeout))
        try:
            for event in call:
                if event.HasField("progress"):
                    yield Progress(step=event.progress.step, total=event.progress.total)
                elif event.HasField("preview"):
                    p = event.preview
                    yield Preview(index=p.index, step=p.step, png=p.png)
                elif event.HasField("result"):
                    yield _images(event.result)
        finally:
            call.cancel()

    @staticmethod
    def _understand_request(prompt: str, images: Sequence[ImageInput], max_new_tokens: int | None,
                            temperature: float | None, top_p: float | None,
                            seed: int | None) -> janus_pb2.UnderstandRequest:
        fields = _set({"prompt": prompt, "images": [_read_image(i) for i in images]},
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return janus_pb2.UnderstandRequest(**fields)

    @staticmethod
    def _generate_request(prompt: str, n: int | None, cfg_weight: float | None, temperature: float | None,
                          top_p: float | None, seed: int | None, steps: int | None = None) -> janus_pb2.GenerateRequest:
        fields = _set({"prompt": prompt}, n=n, cfg_weight=cfg_weight, temperature=temperature, top_p=top_p,
                      seed=seed, steps=steps)
        return janus_pb2.GenerateRequest(**fields)


# --- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.rpc.client", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds; the server stops the job after it")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None)
    commands = parser.add_subparsers(dest="command", required=True)
    understand = commands.add_parser("understand", parents=[sampling],
                                     help="ask about images; prints the answer as it streams")
    understand.add_argument("prompt")
    understand.add_argument("images", nargs="+", type=Path)
    understand.add_argument("--max-new-tokens", type=int, default=None)
    generate = commands.add_parser("generate", parents=[sampling],
                                   help="draw images; writes OUT-0.png, OUT-1.png, ...")
    generate.add_argument("prompt")
    generate.add_argument("-n", type=int, default=None)
    generate.add_argument("--cfg-weight", type=float, default=None)
    generate.add_argument("--steps", type=int, default=None, help="flow models (JanusFlow): ODE steps")
    generate.add_argument("-o", "--out", default="janus", help="file name prefix (default: janus)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with JanusClient(args.target, args.api_key, timeout=args.timeout) as client:
        try:
            if args.command == "understand":
                chunks = client.understand_stream(args.prompt, args.images, temperature=args.temperature,
                                                  max_new_tokens=args.max_new_tokens, seed=args.seed)
                for chunk in chunks:
                    print(chunk.delta, end="", flush=True)
                print()
                return 0
            for event in client.generate_stream(args.prompt, n=args.n, cfg_weight=args.cfg_weight,
                                                temperature=args.temperature, seed=args.seed, steps=args.steps):
                if isinstance(event, Progress):
                    print(f"\r{event.step}/{event.total}", end="", file=sys.stderr, flush=True)
                else:
                    print(file=sys.stderr)
                    for i, png in enumerate(event.pngs):
                        Path(f"{args.out}-{i}.png").write_bytes(png)
                        print(f"{args.out}-{i}.png (seed {event.seed + i})")  # image i draws from seed + i
            return 0
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1


if __name__ == "__main__":
    sys.exit(main())
