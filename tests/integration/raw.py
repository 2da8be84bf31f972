"""Byte-level tools for edge tests: a replica that answers with scripted bytes, and a caller
that speaks HTTP/1.1 over a bare socket (so framing, absolute-form targets and keep-alive
reuse are under the test's control, not a client library's).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tests.integration.conftest import BOUND_S


@dataclass
class Request:
    """One request as the replica read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


#: Writes the answer to one request; returns False to close the connection afterwards.
Script = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request with a Content-Length (or no) body; None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    return Request(method, target, headers, body)


@dataclass
class RawReplica:
    """A replica on 127.0.0.1 whose every answer is written by ``script``, byte for byte.

    ``GET /health`` is answered 200 without the script, so the replica stays healthy.
    """

    script: Script
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    url: str = ""
    server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            while (request := await read_request(reader)) is not None:
                if request.target == "/health":  # the proxy's health checker
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    continue
                self.requests.append(request)
                if not await self.script(request, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def raw_replica(script: Script) -> AsyncIterator[RawReplica]:
    replica = RawReplica(script)
    await replica.start()
    try:
        yield replica
    finally:
        await replica.stop()


def response(status: int, body: bytes, *headers: tuple[str, str]) -> bytes:
    """A complete Content-Length response."""
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + body


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool
    complete: bool  # the body's framing ended properly (not cut by a close)

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class Caller:
    """One keep-alive connection to the proxy, spoken byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Caller:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    def close(self) -> None:
        self.writer.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self, method: str, target: str, body: bytes = b"", *headers: tuple[str, str]
    ) -> Answer:
        head = f"{method} {target} HTTP/1.1\r\nHost: test\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.send(head.encode() + b"\r\n" + body)
        return await asyncio.wait_for(self.answer(), BOUND_S)

    async def at_eof(self) -> bool:
        """True if the proxy closed this connection (read up to EOF, bounded)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), BOUND_S)
        except ConnectionError:
            return True
        return rest == b""

    async def answer(self) -> Answer:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        names = {k.lower(): v for k, v in headers}
        chunked = names.get("transfer-encoding", "").lower() == "chunked"
        body = b""
        complete = True
        try:
            if status in (204, 304):
                pass  # never a body
            elif chunked:
                while True:
                    size = int((await self.reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        complete = await self.reader.readline() == b"\r\n"
                        break
                    body += (await self.reader.readexactly(size + 2))[:-2]
            elif "content-length" in names:
                body = await self.reader.readexactly(int(names["content-length"]))
            else:
                body = await self.reader.read()
        except (asyncio.IncompleteReadError, ValueError, ConnectionError) as err:
            complete = False
            if isinstance(err, asyncio.IncompleteReadError):
                body += err.partial
        return Answer(status, headers, body, chunked, complete)
