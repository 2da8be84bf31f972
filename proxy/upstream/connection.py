"""One upstream HTTP/1.1 connection: the request write, llhttp framing, flow control, timer.

Built directly on ``asyncio.Protocol`` (uvloop-friendly) with exactly what the relay needs:
one write per request, response heads and chunked bodies framed by llhttp (``httptools``),
``Content-Length`` and close-delimited bodies passed straight through, body bytes handed
over through a deque and one waiter Future (no Task per chunk), one read timer per
connection (:class:`~proxy.upstream.timer.ReadTimer`).

What always holds: a connection goes back to the pool only after a response body was read to
its end on an HTTP/1.1 keep-alive connection; any cancellation, error or early ``close()``
closes it instead, so a replica sees its client leave and the pool never hands out a
connection with half a response left on it. A response batchgate cannot relay faithfully
(malformed, oversized head or chunk line, a transfer coding other than ``chunked``) fails
with kind ``malformed``, whatever the read boundaries: the head is cut at its end before it
is parsed, and chunk lines are measured across reads.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, istr

from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.response import Response as Response  # re-exported for the edge
from proxy.upstream.timer import ReadTimer

if TYPE_CHECKING:
    from proxy.upstream.pool import ConnectionPool

_HIGH_WATER = 256 * 1024  # unread body bytes above which we stop reading the socket
LARGE_BODY = 1024 * 1024  # above this, head and body go out as two writes (no big copy)
MAX_HEAD = 64 * 1024
MAX_LINE = 8 * 1024  # chunk-size and trailer lines
_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
# istr keys: a CIMultiDict lookup by one skips folding the name's case (~80 ns a lookup).
_TRANSFER_ENCODING = istr("Transfer-Encoding")
_CONTENT_LENGTH = istr("Content-Length")

# States of a connection: no request; head expected; body by Content-Length, chunked (llhttp)
# or until EOF; response ended.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _UNTIL_EOF, _DONE = range(6)

class _Stray(Exception):
    """Bytes after the end of the response (raised inside llhttp to stop it)."""


class _Callbacks:
    """A connection's llhttp callbacks, bound once: a parser made per response reads them as
    plain attributes (binding six methods for each parser cost ~2 k instructions)."""

    __slots__ = ("on_body", "on_header", "on_headers_complete", "on_message_begin",
                 "on_message_complete", "on_status")

    def __init__(self, conn: _Connection) -> None:
        self.on_body: Callable[[bytes], None] = conn.on_body
        self.on_header: Callable[[bytes, bytes], None] = conn.on_header
        self.on_headers_complete: Callable[[], None] = conn.on_headers_complete
        self.on_message_begin: Callable[[], None] = conn.on_message_begin
        self.on_message_complete: Callable[[], None] = conn.on_message_complete
        self.on_status: Callable[[bytes], None] = conn.on_status

    def unbind(self) -> None:
        """The connection is gone: its bound methods would keep it alive in a cycle."""
        self.on_body = self.on_header = _ignore
        self.on_headers_complete = self.on_message_begin = _ignore
        self.on_message_complete = self.on_status = _ignore


def _ignore(*_: object) -> None:
    return None


class _Connection(asyncio.Protocol):
    """One TCP connection and the framing of the response currently expected on it."""

    def __init__(self, pool: ConnectionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.usable = True  # False after EOF, loss or stray bytes: never hand it out again
        self.lost = False  # connection_lost ran: no byte goes out or comes in any more
        self.fresh = False
        #: For the readiness peek before each reuse (ConnectionPool._take_idle); None: no
        #: socket, never peeked.
        self.poll: select.poll | None = None
        self.keep_alive = False
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.error: Exception | None = None
        self.body_waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[Response] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._state = _IDLE
        self._parser: httptools.HttpResponseParser | None = None
        #: llhttp itself read the last response to its end (chunked): it is ready for the next
        #: one as it is, so start() keeps it (a new parser is ~2 k instructions).
        self._parser_ready = False
        self._callbacks = _Callbacks(self)
        self._remaining = 0
        self._is_head = False
        self._resp: Response | None = None
        self._reason = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._codings: list[str] = []
        self._length: str | None = None
        self._tail = b""  # the last bytes of a head cut across reads (to find its end)
        self._whole_head = b""  # the head being parsed, if it came in one read
        self._head_fed = 0
        self._line = 0  # bytes of the chunk-size or trailer line being read, across reads
        self._line_start = b""  # its first bytes (the size)
        self._chunk_left = 0  # chunk data and its CRLF still to come
        self._trailers = False
        self.timer = ReadTimer(loop, pool.read_timeout_s, self._on_silent, self._is_paused)
        self.idle_since = 0.0  # loop time it went back to the pool
        self.after_stream = False  # its last response was an event stream

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport has Transport's methods without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small requests and SSE events must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # One poll set per connection, made once: a readiness check before each reuse is
            # then one poll(2) and no socket object (a sixth of a MSG_PEEK recv's cost).
            self.poll = select.poll()
            self.poll.register(sock.fileno(), select.POLLIN)

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        self.lost = True
        self.timer.close()
        self._wake_drain()
        state = self._state
        if state == _UNTIL_EOF and exc is None:
            self._finish()
        elif state not in (_IDLE, _DONE):
            # Our request was written: the replica may have read it, so this is no
            # "never delivered" (proxy.core.retry decides what may go out again).
            self._fail(self.failure(f"connection lost mid-response: {exc}"))
        self.pool.lost(self)
        # No byte comes after this: freed by reference counting, not by the cycle collector.
        self._parser = None
        self._parser_ready = False
        self._callbacks.unbind()
        self._resp = None  # the caller holds it (and it holds us) for what is left to read
        self._head_waiter = None  # done by now; its result is that response

    def eof_received(self) -> bool | None:
        self.usable = False
        return None  # let the transport close; connection_lost does the rest

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.timer.last = self.loop.time()  # the replica is taking the upload: not silent
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        self.timer.last = self.loop.time()
        state = self._state
        if state == _LENGTH:
            n = len(data)  # fast path: body bytes straight through, no parser, no copy
            if n < self._remaining:
                self._remaining -= n
                self._deliver(data)
                return
            self._deliver(data[: self._remaining] if n > self._remaining else data)
            self._finish()
            if n > self._remaining:
                self._stray()
            self._remaining = 0
        elif state == _CHUNKED:
            self._feed(data)
        elif state == _UNTIL_EOF:
            self._deliver(data)
        elif state == _HEAD:
            # The head is cut at its end before llhttp sees it, so its size is measured the
            # same whatever the reads, and a body after it takes the fast path from its first
            # byte. The head is handed over after the rest of this read was framed: a body
            # that is malformed from its first bytes on fails the request itself (a clean 502).
            try:
                self._frame_head(data)
            finally:
                waiter = self._head_waiter
                if self._resp is not None and waiter is not None and not waiter.done():
                    waiter.set_result(self._resp)
        else:
            self._stray()

    # -- framing ---------------------------------------------------------------------------

    def _frame_head(self, data: bytes) -> None:
        while self._state == _HEAD:
            buf = self._tail + data if self._tail else data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._head_fed += len(data)
                if self._head_fed > MAX_HEAD:
                    self._fail(self.failure(f"response head over {MAX_HEAD} bytes", "malformed"))
                    return
                self._tail = buf[-3:]
                self._whole_head = b""  # read in pieces: llhttp tells the version
                self._feed(data)
                return
            cut = end + 4 - len(self._tail)
            self._tail = b""
            self._head_fed += cut
            if self._head_fed > MAX_HEAD:
                self._fail(self.failure(f"response head over {MAX_HEAD} bytes", "malformed"))
                return
            head, data = data[:cut], data[cut:]
            # A head read whole, from its first byte: its status line is in hand.
            self._whole_head = head if self._head_fed == cut else b""
            if not self._feed(head):
                return
            self._head_fed = 0  # an interim response (1xx): the final head follows
            if not data:
                return
        if data:
            self.data_received(data)

    def _feed(self, data: bytes) -> bool:
        """Feed llhttp; False when the response failed (the connection is discarded)."""
        parser = self._parser
        assert parser is not None
        try:
            if self._state == _CHUNKED:
                self._measure_chunk_lines(data)
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self.failure("unexpected protocol upgrade", "malformed"))
            return False
        except httptools.HttpParserError as err:
            cause = err.__context__
            if isinstance(cause, _Stray):
                self._stray()
                return False
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(self.failure(f"malformed response: {err}", "malformed"))
            return False
        except UpstreamError as err:
            self._fail(err)
            return False
        return True

    def _measure_chunk_lines(self, data: bytes) -> None:
        # llhttp does not bound chunk-size lines (extensions) or trailer lines: measure them
        # here, across reads, from the sizes the lines themselves give. Shaped for the common
        # read, whole chunks (an event each): per chunk one find, one small slice, one int.
        pos, n = 0, len(data)
        left = self._chunk_left
        while pos < n:
            if left:  # chunk data and its CRLF: skipped, never scanned
                if left >= n - pos:
                    self._chunk_left = left - (n - pos)
                    return
                pos += left
                left = 0
            end = data.find(b"\n", pos)
            if self._line or end < 0:  # a line cut across reads: carry its length and start
                stop = n if end < 0 else end
                if self._line < 20:
                    self._line_start += data[pos : min(stop, pos + 20)]
                self._line += stop - pos
                if self._line > MAX_LINE:
                    raise self._long_line()
                if end < 0:
                    self._chunk_left = 0
                    return
                line = self._line_start
                self._line, self._line_start = 0, b""
            elif end - pos > MAX_LINE:
                raise self._long_line()
            else:
                line = data[pos : min(end, pos + 20)]
            pos = end + 1
            if self._trailers:
                if not line.rstrip(b"\r"):
                    left = 1 << 62  # the end: llhttp reports anything after it
                continue
            try:
                size = int(line.split(b";", 1)[0], 16)  # int() ignores the CR
            except ValueError:
                self._chunk_left = 0
                return  # llhttp rejects the line
            if size:
                left = size + 2
            else:
                self._trailers = True
        self._chunk_left = left

    def _long_line(self) -> UpstreamError:
        return self.failure(f"chunk-size or trailer line over {MAX_LINE} bytes", "malformed")

    # llhttp callbacks (httptools calls them from feed_data)

    def on_message_begin(self) -> None:
        if self._state != _HEAD:
            raise _Stray

    def on_status(self, reason: bytes) -> None:
        self._reason += reason  # almost always one piece: b"" + piece is that piece, no copy

    def on_header(self, name: bytes, value: bytes) -> None:
        # Bytes >= 0x80 are relayed, not dropped: UTF-8 as such, anything else as Latin-1
        # (aiohttp's writer would drop surrogates).
        try:
            text = value.decode()  # UTF-8, without an encoding name to look up
        except UnicodeDecodeError:
            text = value.decode("latin-1")
        # A name is a token (llhttp refuses any other byte): ASCII, so the UTF-8 default
        # decodes it as Latin-1 would, without an encoding name to look up.
        self._headers.add(name.decode(), text.strip(" \t"))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        # llhttp parsed "HTTP/1.1 " at the start of the message when the head starts so; its
        # get_http_version() formats a string (~2.5 k instructions).
        if self._whole_head.startswith(b"HTTP/1.1 "):
            version: tuple[int, int] | None = (1, 1)
        else:
            version = _VERSIONS.get(parser.get_http_version())
        headers = self._headers  # start() gives each response a fresh one
        reason = self._reason.decode("utf-8", "surrogateescape")
        self._reason = b""
        if version is None or not 100 <= status <= 999:
            raise self.failure(f"malformed status line (HTTP/{parser.get_http_version()} "
                               f"{status})", "malformed")
        if status < 200:
            if status == 101:  # we never ask for an upgrade
                raise self.failure("unexpected 101 Switching Protocols", "malformed")
            self._headers = CIMultiDict()  # the final head's own
            return  # interim response (100 Continue, 103 Early Hints): the final one follows
        codings = headers.getall(_TRANSFER_ENCODING, None)
        keep_alive = parser.should_keep_alive()
        self._resp = Response(self, status, reason, headers, version)
        if self._is_head or status == 204 or status == 304:
            self._state = _DONE
        elif codings is not None:
            if ",".join(codings).strip(" \t").lower() != "chunked":
                # We would have to decode it to relay it faithfully: refuse instead.
                raise self.failure(f"unsupported Transfer-Encoding {codings!r}", "malformed")
            self._state = _CHUNKED
            if _CONTENT_LENGTH in headers:
                keep_alive = False  # framing the replica got wrong once: not trusted again
            self._line, self._line_start, self._chunk_left, self._trailers = 0, b"", 0, False
        elif (length := headers.get(_CONTENT_LENGTH)) is not None:  # llhttp validated it
            self._remaining = int(length)
            self._state = _LENGTH if self._remaining else _DONE
        else:
            self._state = _UNTIL_EOF
            keep_alive = False
        self.keep_alive = keep_alive
        if self._state == _DONE:
            self._finish()
        if self._drain_waiter is not None:  # tested here: a call fewer per response
            self._wake_drain()  # an early answer ends the wait for the upload (A9)

    def on_body(self, body: bytes) -> None:
        if self._state != _CHUNKED:
            raise _Stray  # a HEAD response has no body, whatever it says
        # _deliver, inline (keep the two in step): a call fewer per chunk, an event each in a
        # stream (sse16: 705k -> 694k instructions per request, callgrind).
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        if self._state == _CHUNKED:
            self._parser_ready = True
            self._finish()

    # -- body delivery and the end of a response -----------------------------------------

    def _deliver(self, data: bytes) -> None:
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


    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

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

    def start(self, head: bytes, body: bytes, is_head: bool) -> asyncio.Future[Response]:
        """Write one request; the Future resolves with the final response's head.

        Synchronous for bodies up to 1 MiB (one write), so a request costs no extra coroutine.
        """
        transport = self.transport
        assert transport is not None and self._state in (_IDLE, _DONE)
        if not self.usable or transport.is_closing():
            # Closed under us before a byte was written (a replica that accepts and closes at
            # once: the loss can reach us before the task that connected resumes). The read
            # timer went with the connection, so a request written now would wait forever;
            # a transport already closing (a reset, whose connection_lost comes a loop step
            # later) would drop the bytes and fail it as possibly delivered.
            raise UpstreamError(f"replica {self.pool.name}: connection unusable before the "
                                "request was written", kind="reset", replica=self.pool.name,
                                unsent=True)
        self._state, self._is_head = _HEAD, is_head
        self._resp, self.error, self.keep_alive = None, None, False
        if not self._parser_ready:
            # A body framed by Content-Length bypasses llhttp, which still expects it: a
            # fresh parser (~0.5 us) for each response but those llhttp ended itself.
            parser = self._parser = httptools.HttpResponseParser(self._callbacks)
            # RFC 9112 6.3: Transfer-Encoding overrides a Content-Length next to it; the edge
            # drops that Content-Length toward the caller, and the connection is not reused.
            parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self._parser_ready = False
        self._tail, self._head_fed, self._reason, self._whole_head = b"", 0, b"", b""
        self._headers = CIMultiDict()
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

    def checkin(self, reuse: bool, *, after_stream: bool = False) -> None:
        self.timer.stop()
        self.after_stream = after_stream
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
