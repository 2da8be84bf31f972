"""A lean HTTP/1.1 client for the upstream hop: a keep-alive pool and streamed response bodies.

Built directly on ``asyncio.Protocol`` (uvloop-friendly) with exactly what the relay needs:
one write per request, an incremental pure-Python parser, body bytes handed over through a
deque and one waiter Future (no Task per chunk), one read-timeout timer per request that is
re-armed only when it fires. It replaces aiohttp's ClientSession, whose per-request objects,
tracing hooks and per-read timer rescheduling cost more CPU than the proxy's own work.

What always holds: a connection goes back to the pool only after a response body was read to
its end on an HTTP/1.1 keep-alive connection; any cancellation, error or early ``close()``
closes it instead, so a replica sees its client leave and the pool never hands out a
connection with half a response left on it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections import deque
from typing import TYPE_CHECKING, cast

from multidict import CIMultiDict

from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.timer import ReadTimer

if TYPE_CHECKING:
    from proxy.upstream.pool import ConnectionPool

_HIGH_WATER = 256 * 1024  # unread body bytes above which we stop reading the socket
LARGE_BODY = 1024 * 1024  # above this, head and body go out as two writes (no big copy)
_MAX_HEAD = 64 * 1024
_MAX_LINE = 8 * 1024  # chunk-size and trailer lines
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# All header lines at once (one C-level match instead of one per name): `token:value`, no bare
# CR or LF in a value, no obs-fold (a line starting with whitespace is not a token).
_HEADER_BLOCK = re.compile(rf"(?:{_TOKEN}:[^\r\n]*\r\n)*{_TOKEN}:[^\r\n]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_VERSIONS = {"HTTP/1.1": (1, 1), "HTTP/1.0": (1, 0)}

# Parser states of a connection.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_EOF, _DONE = (
    range(9)
)


#: Old names of the upstream failures, kept for importers (proxy.edge.relay).
UpstreamClosedError = UpstreamError
UpstreamTimeoutError = UpstreamTimeout


class Response:
    """Status line and headers of a final response; the body is read with :meth:`readany`.

    The caller must end it with :meth:`release` (body read to its end) or :meth:`close`.
    """

    __slots__ = ("_conn", "_ended", "complete", "headers", "reason", "status", "version")

    def __init__(
        self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str],
        version: tuple[int, int],
    ) -> None:
        self._conn = conn
        self._ended = False  # released or closed: the connection is no longer ours
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.complete = False  # body fully received (set by the connection)

    def __repr__(self) -> str:
        return f"<Response {self.status} complete={self.complete} ended={self._ended}>"

    async def readany(self) -> bytes:
        """Next available body bytes (all that is buffered, joined); b"" at the end."""
        conn = self._conn
        while True:
            if self._ended:
                if self.complete:
                    return b""
                raise conn.failure("response was closed before its body was read")
            body = conn.body
            if body:
                data = body.popleft() if len(body) == 1 else b"".join(body)
                body.clear()
                conn.buffered = 0
                if conn.paused:
                    conn.resume()
                return data
            if self.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            waiter = conn.body_waiter = conn.loop.create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                self.close()  # half a body on it: never reusable
                raise
            finally:
                conn.body_waiter = None

    def release(self) -> None:
        """Return the connection to the pool if the body is complete and it may be kept."""
        if not self._ended:
            self._ended = True
            self._conn.checkin(self.complete and self._conn.keep_alive)

    def close(self) -> None:
        """Abort now: close the connection (the replica sees its client leave)."""
        if not self._ended:
            self._ended = True
            self._conn.checkin(False)


class _Connection(asyncio.Protocol):
    """One TCP connection and the parser of the response currently expected on it."""

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.usable = True  # False after EOF, loss or stray bytes: never hand it out again
        self.fresh = False
        self.fd, self.family = -1, socket.AF_INET  # for peeking before reuse (no fd: never)
        self.keep_alive = False
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: Exception | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._buf = bytearray()
        self._state = _IDLE
        self._remaining = 0
        self._is_head = False
        self._got_bytes = False
        self._resp: Response | None = None
        self.timer = ReadTimer(loop, pool.read_timeout_s, self._on_silent, self._is_paused)
        self.idle_since = 0.0  # loop time it went back to the pool

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests and SSE events must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd, self.family = sock.fileno(), sock.family

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.timer.stop()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        state = self._state
        if state == _UNTIL_EOF and exc is None:
            self._finish()
        elif state not in (_IDLE, _DONE):
            # Our request was written: the replica may have read it, so this is no
            # "never delivered" (proxy.core.retry decides what may go out again).
            self._fail(self.failure(f"connection lost mid-response: {exc}"))
        self.pool.lost(self)

    def eof_received(self) -> bool | None:
        self.usable = False
        return None  # let the transport close; connection_lost does the rest

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.timer.last = self.loop.time()  # the replica is taking the upload: not silent
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.timer.last = self.loop.time()
        state = self._state
        if state in (_LENGTH, _CHUNK_DATA) and not self._buf:
            n = len(data)  # fast path: body bytes straight through, no copy into _buf
            if n <= self._remaining:
                self._remaining -= n
                self._deliver(data)
                if not self._remaining:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_CRLF
                return
        elif state == _UNTIL_EOF:
            self._deliver(data)
            return
        elif state in (_IDLE, _DONE):
            self._stray()
            return
        self._got_bytes = True
        self._buf += data
        try:
            self._parse()
        except UpstreamError as err:
            self._fail(err)

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while buf:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise self.failure("response head too large")
                    return
                head = buf[:end].decode("utf-8", "surrogateescape")
                del buf[: end + 4]
                self._on_head(head)
            elif state in (_LENGTH, _CHUNK_DATA):
                take = bytes(buf[: self._remaining])
                del buf[: len(take)]
                self._remaining -= len(take)
                self._deliver(take)
                if not self._remaining:
                    if state == _LENGTH:
                        self._finish()
                    else:
                        self._state = _CHUNK_CRLF
            elif state in (_CHUNK_SIZE, _TRAILERS):
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_LINE:
                        raise self.failure("chunk-size or trailer line too long")
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if state == _TRAILERS:
                    if not line:
                        self._finish()
                    continue
                size = line.split(b";", 1)[0].strip(b" \t")  # chunk extensions are ignored
                if not _HEX.fullmatch(size):
                    raise self.failure(f"bad chunk size line {line[:40]!r}")
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise self.failure("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _UNTIL_EOF:
                self._deliver(bytes(buf))
                buf.clear()
            else:  # bytes beyond the end of the response: the connection is not trustworthy
                buf.clear()
                self._stray()

    def _on_head(self, head: str) -> None:
        status_line, _, block = head.partition("\r\n")
        proto, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        version = _VERSIONS.get(proto)
        if version is None or len(code) != 3 or not code.isdigit() or not code.isascii():
            raise self.failure(f"malformed status line {status_line[:80]!r}")
        status = int(code)
        if status < 200:
            if status == 101:  # we never ask for an upgrade
                raise self.failure("unexpected 101 Switching Protocols")
            return  # interim response (100 Continue, 103 Early Hints): the final one follows
        headers: CIMultiDict[str] = CIMultiDict()
        if block:
            if not _HEADER_BLOCK.fullmatch(block):
                raise self.failure(f"malformed header lines {block[:200]!r}")
            add = headers.add
            for line in block.split("\r\n"):
                name, _, value = line.partition(":")
                add(name, value.strip(" \t"))
        keep_alive = version == (1, 1)
        if keep_alive and headers.get("Connection") is not None:
            tokens = ",".join(headers.getall("Connection")).lower().split(",")
            keep_alive = "close" not in [t.strip() for t in tokens]
        resp = self._resp = Response(self, status, reason, headers, version)
        if self._is_head or status == 204 or status == 304:
            self._state = _DONE
        elif headers.get("Transfer-Encoding") is not None:
            codings = ",".join(headers.getall("Transfer-Encoding")).lower()
            if codings.rsplit(",", 1)[-1].strip() == "chunked":
                self._state = _CHUNK_SIZE
            else:  # RFC 9112 6.3: any other final coding is delimited by the close
                self._state = _UNTIL_EOF
                keep_alive = False
        elif (lengths := headers.getall("Content-Length", None)) is not None:
            length = lengths[0] if len(set(lengths)) == 1 else ""
            if not length.isdigit() or not length.isascii():
                raise self.failure(f"bad Content-Length {lengths!r}")
            self._remaining = int(length)
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_EOF
            keep_alive = False
        self.keep_alive = keep_alive
        if self._state == _DONE:
            self._finish()
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)

    # -- body delivery and the end of a response -----------------------------------------

    def _deliver(self, data: bytes) -> None:
        self._got_bytes = True
        self.body.append(data)
        self.buffered += len(data)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume(self) -> None:
        self.paused = False
        self.timer.last = self.loop.time()  # the pause was the reader's silence, not the replica's
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _finish(self) -> None:
        self._state = _DONE
        self.timer.stop()
        if self._resp is not None:
            self._resp.complete = True
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _stray(self) -> None:
        # Bytes nobody asked for (after a response, or on an idle connection).
        self.usable = self.keep_alive = False
        if self._state == _IDLE and self.transport is not None:
            self.transport.close()

    def _fail(self, err: Exception) -> None:
        if self.error is None:
            self.error = err
        self.usable = self.keep_alive = False
        self.timer.stop()
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(err)
        if self.body_waiter is not None and not self.body_waiter.done():
            self.body_waiter.set_result(None)  # readany finds self.error after the buffer
        if self.transport is not None:
            self.transport.close()

    # -- read timeout ---------------------------------------------------------------------

    def _is_paused(self) -> bool:
        return self.paused

    def _on_silent(self) -> None:
        if self._state not in (_IDLE, _DONE):
            self._fail(UpstreamTimeout(
                f"replica {self.pool.name} sent nothing for {self.pool.read_timeout_s:g}s",
                replica=self.pool.name))

    def failure(self, detail: str, kind: str = "reset") -> UpstreamError:
        return UpstreamError(f"replica {self.pool.name}: {detail}", kind=kind,
                             replica=self.pool.name)

    # -- the request ---------------------------------------------------------------------

    def peek_closed(self) -> bool:
        """True if the replica closed this idle connection (EOF or RST, or stray bytes are
        already in the kernel) though the loop has not processed it yet. One non-blocking
        syscall, before a single byte of the next request is written."""
        if self.fd < 0:
            return False
        sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=self.fd)
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False  # nothing to read: open
        except OSError:
            return True  # reset
        finally:
            sock.detach()  # the transport owns the descriptor
        return True  # EOF, or bytes nobody asked for: either way not reusable

    def start(self, head: bytes, body: bytes, is_head: bool) -> asyncio.Future[Response]:
        """Write one request; the Future resolves with the final response's head.

        Synchronous for bodies up to 1 MiB (one write), so a request costs no extra coroutine.
        """
        transport = self.transport
        assert transport is not None and self._state in (_IDLE, _DONE)
        self._state, self._is_head, self._got_bytes = _HEAD, is_head, False
        self._resp, self.error, self.keep_alive = None, None, False
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._head_waiter = waiter
        if len(body) <= LARGE_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        # From the request on; a replica that stops reading the upload is silent too (each
        # resume_writing is a sign of life).
        self.timer.start()
        return waiter

    async def drain(self) -> None:
        """After a large body: wait until the transport took it (the timer runs meanwhile)."""
        transport = self.transport
        if self._write_paused and transport is not None and not transport.is_closing():
            self._drain_waiter = self.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def checkin(self, reuse: bool) -> None:
        self.timer.stop()
        # An upload the replica stopped taking (it answered early): the rest is still queued.
        if self._write_paused or (self.transport is not None
                                  and self.transport.get_write_buffer_size()):
            reuse = False
        self.body.clear()
        self.buffered = 0
        reuse = reuse and self.usable and not self.fresh and self._state == _DONE
        if reuse:
            self._state = _IDLE
            self._resp = None
            if self.paused:
                self.resume()
        else:
            self._state = _DONE  # whatever arrives now is not for anyone
            if self.transport is not None:
                self.transport.close()
        self.pool.checkin(self, reuse)
