"""Chat with a running splitserve cluster over its public gRPC API, with the SDK.

    splitserve up                                # serves gRPC on 127.0.0.1:50051 by default
    pip install ./sdk                            # grpcio + protobuf only
    python examples/grpc_chat.py "How do I read a file line by line in Python?"
    python examples/grpc_chat.py --async --target 127.0.0.1:50051 "Hello!"
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from splitserve_sdk import AsyncClient, Client, SplitserveError


def run_sync(ns: argparse.Namespace, messages: list[dict]) -> None:
    with Client(ns.target, timeout=ns.timeout, token=ns.token) as client:
        health = client.health()
        print(f"# gateway: {health.status} workers={health.workers}", file=sys.stderr)
        last = None
        for chunk in client.stream_chat(messages, max_tokens=ns.max_tokens,
                                        temperature=ns.temperature):
            print(chunk.text, end="", flush=True)
            last = chunk
        print()
        if last is not None and last.usage is not None:
            print(f"# finish_reason={last.finish_reason} usage={last.usage}", file=sys.stderr)


async def run_async(ns: argparse.Namespace, messages: list[dict]) -> None:
    async with AsyncClient(ns.target, timeout=ns.timeout, token=ns.token) as client:
        models = await client.models()
        print(f"# models: {[m.id for m in models]}", file=sys.stderr)
        async for chunk in client.stream_chat(messages, max_tokens=ns.max_tokens,
                                              temperature=ns.temperature):
            print(chunk.text, end="", flush=True)
        print()
        whole = await client.chat(messages, max_tokens=ns.max_tokens, temperature=0)
        print(f"# greedy, whole: {whole.text!r} ({whole.usage})", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="Hello! What can you do?")
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway gRPC host:port")
    p.add_argument("--system", default="You are a helpful assistant.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0, help="deadline per call (s)")
    p.add_argument("--token", help="auth token, sent as `authorization: Bearer ...`")
    p.add_argument("--async", dest="use_async", action="store_true", help="use AsyncClient")
    ns = p.parse_args()
    messages = [{"role": "system", "content": ns.system}, {"role": "user", "content": ns.prompt}]
    try:
        if ns.use_async:
            asyncio.run(run_async(ns, messages))
        else:
            run_sync(ns, messages)
    except SplitserveError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
