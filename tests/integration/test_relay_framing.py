"""How the relay frames answers toward the caller when a replica breaks, at the byte level.

Before the first body byte nothing is committed, so a failure is still a proper 502/504; an
event stream is always re-framed chunked, so a cut stream ends with its error event in a
properly ended body and the keep-alive connection stays usable; any other cut body ends
without its final chunk on a closed connection, so it never looks complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.edge.relay import HOLD_WHOLE_BYTES
from tests.integration.conftest import FakeReplica, Proxy, make_config, until
from tests.integration.raw import Caller, Request, raw_replica, response

Factory = Callable[..., Any]
COMPLETIONS = "/v1/completions"
OK_BODY = b'{"ok": true}'
EVENT = b'data: {"choices":[{"index":0,"text":" t"}]}\n\n'


async def _short_length(_r: Request, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    return False  # closed before the first body byte


async def _short_length_some_bytes(_r: Request, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"a":1')
    return False  # closed 94 bytes short of its declared length


async def _silent_after_some_bytes(_r: Request, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n"
            b'{"a"')
    await w.drain()
    await asyncio.Event().wait()  # silent until the test stops the replica
    return False


async def _silent(_r: Request, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n")
    await w.drain()
    await asyncio.Event().wait()  # silent until the test stops the replica
    return False


async def _bad_chunk_size(_r: Request, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    await w.drain()
    await asyncio.Event().wait()
    return False


@pytest.mark.parametrize(
    ("script", "status", "code"),
    [(_short_length, 502, "upstream_reset"), (_silent, 504, "upstream_timeout"),
     (_bad_chunk_size, 502, None), (_short_length_some_bytes, 502, "upstream_reset"),
     (_silent_after_some_bytes, 504, "upstream_timeout")],
    ids=["short-content-length", "silent", "chunk-size-zz", "short-content-length-some-bytes",
         "silent-after-some-bytes"],
)
async def test_failure_before_the_first_body_byte_is_a_proper_error_answer(
    proxy: Factory, script: Any, status: int, code: str | None
) -> None:
    async with raw_replica(script) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), read_timeout_s=0.3, retries=0))
        caller = await Caller.open(p.url)
        try:
            answer = await caller.request("POST", COMPLETIONS, b"{}",
                                          ("Content-Type", "application/json"))
        finally:
            caller.close()
    assert answer.status == status, answer
    assert answer.complete
    error = json.loads(answer.body)["error"]
    assert error["type"] == "upstream_error"
    assert error["code"].startswith("upstream_")
    if code is not None:
        assert error["code"] == code
    assert len(r.requests) == 1  # a request that reached a replica is never sent twice
    kind = error["code"].removeprefix("upstream_")
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind=kind) == 1


def _cut_or_answer(framing: str) -> Any:
    async def script(request: Request, w: asyncio.StreamWriter) -> bool:
        if b"cut" not in request.body:
            w.write(response(200, OK_BODY, ("Content-Type", "application/json")))
            return True
        if framing == "sse-length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Content-Length: 1000\r\n\r\n" + EVENT)
        elif framing == "json-chunked":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n")
        else:  # json-length, above what is held whole: streamed as it comes (relay.py)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n{\"a\":" % (HOLD_WHOLE_BYTES + 1))
        return False  # the replica dies mid-body

    return script


async def test_cut_event_stream_ends_chunked_with_its_error_and_the_connection_stays_usable(
    proxy: Factory,
) -> None:
    async with raw_replica(_cut_or_answer("sse-length")) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), retries=0))
        caller = await Caller.open(p.url)
        try:
            cut = await caller.request("POST", COMPLETIONS, b'{"cut": 1}')
            again = await caller.request("POST", COMPLETIONS, b"{}")
        finally:
            caller.close()
    assert cut.status == 200
    assert cut.chunked and cut.header("Content-Length") is None
    assert cut.complete  # a properly ended chunked body...
    first, error, rest = cut.body.split(b"\n\n", 2)
    assert first + b"\n\n" == EVENT
    assert error.startswith(b"event: error\ndata: ")  # ...that says it was cut
    assert json.loads(error.split(b"data: ", 1)[1])["error"]["code"] == "upstream_reset"
    assert rest == b""
    # The same connection, in sync: the next answer is read as itself.
    assert again.status == 200 and again.body == OK_BODY


async def test_complete_event_stream_framed_by_length_is_rechunked(
    replicas: Factory, proxy: Factory
) -> None:
    body = EVENT * 3 + b"data: [DONE]\n\n"

    async def sse(_r: Request, w: asyncio.StreamWriter) -> bool:
        w.write(response(200, body, ("Content-Type", "text/event-stream")))
        return True

    async with raw_replica(sse) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)))
        caller = await Caller.open(p.url)
        try:
            answers = [await caller.request("POST", COMPLETIONS, b"{}") for _ in range(2)]
        finally:
            caller.close()
    for answer in answers:
        assert answer.status == 200 and answer.chunked and answer.complete
        assert answer.header("Content-Length") is None
        assert answer.body == body


@pytest.mark.parametrize("framing", ["json-chunked", "json-length"])
async def test_cut_body_that_is_not_a_stream_never_looks_complete(
    proxy: Factory, framing: str
) -> None:
    async with raw_replica(_cut_or_answer(framing)) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1), retries=0))
        caller = await Caller.open(p.url)
        try:
            cut = await caller.request("POST", COMPLETIONS, b'{"cut": 1}')
            assert await caller.at_eof(), "the connection must be closed after a cut body"
        finally:
            caller.close()
    assert cut.status == 200
    assert not cut.complete
    assert cut.body == b'{"a":'
    assert p.metric("batchgate_upstream_errors_total", replica="r", kind="reset") == 1


async def test_content_length_next_to_chunked_is_not_sent_to_the_caller(
    proxy: Factory,
) -> None:
    async def both(request: Request, w: asyncio.StreamWriter) -> bool:
        # RFC 9112 6.3: Transfer-Encoding wins; the Content-Length is not the body's length.
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                b"c\r\n" + OK_BODY + b"\r\n0\r\n\r\n")
        return True

    async with raw_replica(both) as r:
        p: Proxy = await proxy(make_config(("r", r.url, 1)))
        caller = await Caller.open(p.url)
        try:
            answers = [await caller.request("POST", COMPLETIONS, b"{}") for _ in range(2)]
        finally:
            caller.close()
    for answer in answers:
        assert answer.status == 200 and answer.body == OK_BODY, answer
        length = answer.header("Content-Length")
        assert length is None or int(length) == len(OK_BODY)


async def test_stalled_caller_gets_its_connection_closed_and_a_body_that_is_not_complete(
    replicas: Factory, proxy: Factory
) -> None:
    r: FakeReplica = await replicas("r")
    p: Proxy = await proxy(make_config(("r", r.url, 1), send_timeout_s=0.3))
    caller = await Caller.open(p.url)
    body = json.dumps({"stream": True, "events": 400, "pad": 65536}).encode()  # ~26 MB
    try:
        caller.send(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
        # The caller reads nothing: sockets fill, the proxy waits the stall limit, then cuts.
        await until(lambda: p.scheduler.idle() and r.arrivals == 1, "slot released")
        answer = await caller.answer()  # now read what was sent before the cut
        assert await caller.at_eof()
    finally:
        caller.close()
    assert answer.status == 200
    assert not answer.complete, "a stalled caller's stream must not end as if complete"
    assert len(answer.body) < 400 * 65536
