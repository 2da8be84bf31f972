"""The bench upstream: a fast HTTP/1.1 server on raw asyncio + uvloop, cheap enough that what
the benchmark sees is the proxy in front of it, not the upstream.

Routes (any method unless said):

* ``GET /health``: 200 (batchgate and HAProxy probe it).
* ``.../v1/models``: a one-model list.
* ``POST /v1/completions``, ``/v1/chat/completions``: an OpenAI-style completion of
  ``max_tokens`` tokens (``usage`` included); with ``"stream": true`` an SSE stream of
  ``max_tokens`` events, ``--interval-ms`` apart (default 0).
* ``/sse?events=N&interval_ms=M``: a chunked ``text/event-stream`` of N events M ms apart (on
  an absolute schedule, so gaps do not drift), then ``data: [DONE]``. Each event carries
  ``"t"``: ``time.monotonic()`` when written, which is comparable across processes on Linux.
* ``/hold``: never answered; the connection stays open until the client closes it.
* anything else (``POST /json``): a small fixed JSON answer.

Request bodies need a ``Content-Length`` (every client here sends one); keep-alive is honoured.
Usage: python bench/upstream.py --port PORT [--interval-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import time
from typing import cast
from urllib.parse import parse_qsl

import uvloop

SMALL_JSON = b'{"id":"bench","object":"ok","ok":true,"data":[1,2,3]}'
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model","owned_by":"bench"}]}'
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"object":"text_completion","choices":[{"index":0,"text":" tok"}],"t":%.6f}\n\n'
DONE = b"data: [DONE]\n\n"


def response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


OK_SMALL = response(b"200 OK", SMALL_JSON)
OK_HEALTH = response(b"200 OK", b"ok\n", b"text/plain")
OK_MODELS = response(b"200 OK", MODELS)
BAD = response(b"400 Bad Request", b'{"error":{"message":"bad request"}}')
END = chunk(DONE) + b"0\r\n\r\n"


def completion(body: bytes) -> tuple[bool, int, bool]:
    """(stream, max_tokens, include_usage) of an OpenAI completion body."""
    obj = json.loads(body) if body else {}
    options = obj.get("stream_options") or {}
    return bool(obj.get("stream")), int(obj.get("max_tokens") or 16), bool(
        options.get("include_usage")
    )


def completion_json(tokens: int) -> bytes:
    return response(
        b"200 OK",
        b'{"id":"cmpl-bench","object":"text_completion","model":"bench","choices":[{"index":0,'
        b'"text":"' + b" tok" * tokens + b'","finish_reason":"length"}],"usage":'
        b'{"prompt_tokens":1,"completion_tokens":%d,"total_tokens":%d}}' % (tokens, tokens + 1),
    )


class Conn(asyncio.Protocol):
    """One client connection: parse requests, answer them; one stream at a time."""

    interval_s = 0.0  # default event interval of streamed completions (--interval-ms)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.streaming = False
        self.close_after = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        self.process()

    def process(self) -> None:
        while not self.streaming and self.transport is not None:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                return
            body = buf[end + 4 : end + 4 + length]
            self.buf = buf[end + 4 + length :]
            self.close_after = b"\r\nconnection: close" in head
            parts = head.split(b" ", 2)
            if len(parts) < 3:
                self.transport.write(BAD)
                self.transport.close()
                return
            self.handle(parts[1], body)
            if self.close_after and not self.streaming and self.transport is not None:
                self.transport.close()

    def handle(self, target: bytes, body: bytes) -> None:
        assert self.transport is not None
        path, _, query = target.partition(b"?")
        if path == b"/health":
            self.transport.write(OK_HEALTH)
        elif path.endswith(b"/v1/models"):
            self.transport.write(OK_MODELS)
        elif path.endswith(b"/completions"):
            try:
                stream, tokens, usage = completion(body)
            except (ValueError, TypeError, AttributeError):
                self.transport.write(BAD)
                return
            if stream:
                self.stream(tokens, self.interval_s, usage)
            else:
                self.transport.write(completion_json(tokens))
        elif path == b"/sse":
            args = dict(parse_qsl(query.decode()))
            self.stream(int(args.get("events", 16)), float(args.get("interval_ms", 0)) / 1000,
                        False)
        elif path == b"/hold":
            self.streaming = True  # never answered; requests behind it wait too
        else:
            self.transport.write(OK_SMALL)

    def stream(self, events: int, interval_s: float, usage: bool) -> None:
        transport = self.transport
        assert transport is not None
        self.streaming = True
        transport.write(SSE_HEAD)
        tail = END
        if usage:
            tail = chunk(b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":'
                         b'%d,"total_tokens":%d}}\n\n' % (events, events + 1)) + END
        if interval_s <= 0:
            for _ in range(events):
                transport.write(chunk(EVENT % time.monotonic()))
            transport.write(tail)
            self.streaming = False  # process() goes on with the next request
            return
        loop = asyncio.get_running_loop()
        start = loop.time()

        def send(index: int) -> None:
            self.timer = None
            if self.transport is None:
                return
            self.transport.write(chunk(EVENT % time.monotonic()))
            if index + 1 < events:
                self.timer = loop.call_at(start + (index + 1) * interval_s, send, index + 1)
            else:
                self.transport.write(tail)
                self.stream_done()

        send(0)

    def stream_done(self) -> None:
        """A timed stream ended: close, or serve what the client sent meanwhile."""
        self.streaming = False
        if self.close_after and self.transport is not None:
            self.transport.close()
        elif self.buf:
            self.process()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval-ms", type=float, default=0.0,
                        help="gap between events of streamed completions")
    args = parser.parse_args()
    Conn.interval_s = args.interval_ms / 1000
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
