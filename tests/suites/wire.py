"""Byte-level pieces of the fuzz suite: a replica that records every request it parses (and
every byte it could not), and a reader for whatever the proxy writes back on a raw socket.

The replica parses leniently on purpose (bare LF ends a line, any ``Content-Length`` or
``chunked`` is honoured), like a permissive engine behind a proxy: if batchgate ever forwarded
an injected header line, a second framing header or bytes past the body it meant to send,
this replica would read them as a request of their own, and the test would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

#: Every answer of the replica carries this header: a 5xx without it is batchgate's own.
MARK = "x-fuzz-replica"
_LIMIT = 1 << 22  # a head up to 4 MiB is read whole (the proxy's own limits are far below)


@dataclass
class Seen:
    """One request as the replica framed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class RecordingReplica:
    """Answers every request ``200`` with :data:`MARK`; ``GET /health`` is not recorded."""

    requests: list[Seen] = field(default_factory=list)
    #: Bytes it could not frame as a request: batchgate sent something no parser should get.
    garbage: list[bytes] = field(default_factory=list)
    url: str = ""
    server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_LIMIT)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while (seen := await self._read(reader)) is not None:
                if seen.target != "/health":
                    self.requests.append(seen)
                body = b"" if seen.method == "HEAD" else json.dumps(
                    {"target": seen.target, "bytes": len(seen.body)}).encode()
                length = 0 if seen.method == "HEAD" else len(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s: 1\r\n"
                             b"Content-Type: application/json\r\n\r\n%s"
                             % (length, MARK.encode(), body))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> Seen | None:
        try:
            head = await _read_head(reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            rest = getattr(err, "partial", b"")
            if rest.strip():
                self.garbage.append(rest)
            return None
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self.garbage.append(head)
            return None
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, colon, value = line.partition(b":")
            if not colon or line[:1] in (b" ", b"\t") or name != name.strip():
                self.garbage.append(head)  # a folded line or a header without a name
                return None
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        names = [k for k, _ in headers]
        try:
            if "transfer-encoding" in names:
                body = await _read_chunked(reader)
            elif "content-length" in names:
                if names.count("content-length") > 1:
                    self.garbage.append(head)
                    return None
                body = await reader.readexactly(int(dict(headers)["content-length"]))
            else:
                body = b""
        except (ValueError, asyncio.IncompleteReadError):
            self.garbage.append(head)
            return None
        return Seen(parts[0].decode("latin-1"), parts[1].decode("latin-1"), headers, body)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Up to the blank line, where a bare LF counts as a line end (lenient, see the module)."""
    lines: list[bytes] = []
    while True:
        line = await reader.readuntil(b"\n")
        if line in (b"\r\n", b"\n"):
            if lines:
                return b"".join(lines)
            continue  # RFC 9112 2.2: blank lines before a request line are ignored
        lines.append(line)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\n")).strip():
                pass  # trailers
            return body
        body += await reader.readexactly(size)
        await reader.readuntil(b"\n")


@contextlib.asynccontextmanager
async def recording_replica() -> AsyncIterator[RecordingReplica]:
    replica = RecordingReplica()
    await replica.start()
    try:
        yield replica
    finally:
        await replica.stop()


@dataclass
class Reply:
    """One response the proxy wrote back."""

    status: int
    headers: dict[str, str]  # lower-case names; the last value of a repeated one
    body: bytes
    tunnel: bool = False  # a 2xx to CONNECT: what follows is a tunnel, not HTTP

    @property
    def from_replica(self) -> bool:
        return MARK in self.headers


class BadReply(AssertionError):
    """The proxy wrote bytes that are not an HTTP/1.1 response."""


async def read_replies(reader: asyncio.StreamReader, methods: list[str]) -> list[Reply]:
    """Responses up to EOF; ``methods`` are those of the requests sent, in order (a HEAD's
    answer has no body). After an answer with ``Connection: close``, or a 2xx to CONNECT,
    nothing else is read."""
    replies: list[Reply] = []
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            if err.partial:
                raise BadReply(f"a cut head after {len(replies)} answers: {err.partial!r}") from err
            return replies
        except ConnectionError:
            return replies
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if version not in ("HTTP/1.1", "HTTP/1.0") or not rest[:3].isdigit():
            raise BadReply(f"not a status line: {lines[0]!r}")
        status = int(rest[:3])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines[1:])}
        if 100 <= status < 200:
            continue  # 100 Continue: the final answer follows
        method = methods[len(replies)] if len(replies) < len(methods) else "GET"
        keep = "close" if version == "HTTP/1.0" else "keep-alive"  # each version's default
        closing = headers.get("connection", keep).lower() == "close"
        if method == "CONNECT" and 200 <= status < 300:
            # RFC 9110 9.3.6: no body; the connection is a tunnel from here on.
            replies.append(Reply(status, headers, b"", tunnel=True))
            return replies
        try:
            if method == "HEAD" or status in (204, 304):
                body = await reader.read() if closing else b""
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = await _read_chunked(reader)
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        except (asyncio.IncompleteReadError, ValueError) as err:
            raise BadReply(f"a cut or bad body in answer {len(replies)}: {headers}") from err
        replies.append(Reply(status, headers, body))
        if closing:
            return replies
