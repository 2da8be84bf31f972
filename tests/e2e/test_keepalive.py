"""llama-server closes the connection after every stream while advertising keep-alive.

A proxy that pools connections may pick one the engine has already closed. batchgate peeks
at a pooled connection before writing (the engine's close follows the last byte of the
answer, so the peek finds it), and once it has seen a replica close a keep-alive connection
early it stops pooling for that replica: the close costs no error, and no request is ever
written on a dead connection and then resent.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.e2e.harness import BOUND_S, REPLICAS, Scrape, Stack, scrape

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16


def http11_post(path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(payload), payload)
    )


async def test_engine_closes_the_connection_after_every_stream(stack: Stack) -> None:
    """The quirk itself, on a raw socket to the engine (no batchgate, no client library)."""
    engine = stack.engines[0]
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    try:
        for stream in (False, True):
            request = {"prompt": "hi", "max_tokens": 4, "stream": stream}
            writer.write(http11_post("/v1/completions", request))
            await writer.drain()
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)).lower()
            assert head.startswith(b"http/1.1 200"), head
            assert b"keep-alive: timeout=" in head and b"connection: close" not in head
            if not stream:  # a plain answer keeps the connection: the stream reuses it
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                await asyncio.wait_for(reader.readexactly(length), BOUND_S)
                continue
            body = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), BOUND_S)
            assert b"data: [DONE]" in body
            # ...and right after the last chunk the engine closes it, keep-alive or not.
            assert await asyncio.wait_for(reader.read(), BOUND_S) == b""
    finally:
        writer.close()


def ok_and_retried(before: Scrape, after: Scrape) -> tuple[float, float, float]:
    """(answers with 200, resends, upstream errors) between two scrapes of batchgate."""

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    return (
        delta("batchgate_requests_total", code="200"),
        delta("batchgate_upstream_retries_total"),
        delta("batchgate_upstream_errors_total"),
    )


async def call(sdk: AsyncOpenAI, i: int) -> int:
    """Cycles streamed chat, plain chat, streamed completion, plain completion.

    With two replicas and round-robin ties, each replica then sees a stream followed by a
    plain request, then a stream again: every kind of request follows a stream somewhere.
    """
    kind = i % 4
    if kind == 0:
        stream = await sdk.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"s{i}"}],
            max_tokens=MAX_TOKENS, stream=True,
        )
        return sum([1 async for c in stream if c.choices and c.choices[0].delta.content])
    if kind == 1:
        chat = await sdk.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": f"p{i}"}],
            max_tokens=MAX_TOKENS,
        )
        assert chat.usage is not None
        return chat.usage.completion_tokens
    if kind == 2:
        completions = await sdk.completions.create(
            model="tiny-llama", prompt=f"s{i}", max_tokens=MAX_TOKENS, stream=True
        )
        return sum([1 async for c in completions if c.choices and c.choices[0].text])
    completion = await sdk.completions.create(
        model="tiny-llama", prompt=f"p{i}", max_tokens=MAX_TOKENS
    )
    assert completion.usage is not None
    return completion.usage.completion_tokens


async def test_sequential_requests_after_streams_never_fail(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    """One caller, one request at a time, streams and plain requests alternating."""
    before = await scrape(http, stack.batchgate.url)
    tokens = [await call(sdk, i) for i in range(32)]
    assert tokens == [MAX_TOKENS] * 32
    after = await scrape(http, stack.batchgate.url)
    answered, retried, errors = ok_and_retried(before, after)
    assert answered == 32
    assert (retried, errors) == (0, 0)


async def test_96_back_to_back_streams_behind_a_queue_cost_zero_errors(
    stack: Stack, sdk: AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    """The race that makes the quirk bite: a queued request gets a slot the instant a stream
    ends, and would go out on that stream's pooled connection just as the engine closes it.
    Three bursts of 32 callers (4 per slot), 96 in all: no error, no resend."""
    callers = 4 * 4 * len(REPLICAS)  # kinds 0 and 2 of call(): every call a stream
    before = await scrape(http, stack.batchgate.url)
    sent = 0
    while sent < 96:
        tokens = await asyncio.wait_for(
            asyncio.gather(*(call(sdk, 2 * i) for i in range(callers))), BOUND_S
        )
        assert tokens == [MAX_TOKENS] * callers
        sent += callers
    answered, retried, errors = ok_and_retried(before, await scrape(http, stack.batchgate.url))
    assert answered == sent == 96
    assert (retried, errors) == (0, 0)
