"""aiohttp's protocol with batchgate's limits on callers (:mod:`proxy.edge.limits`).

aiohttp's ``RequestHandler`` times only idle keep-alive connections; :class:`LimitedHandler`
subclasses it to time each request's head and body on one timer per connection, to count the
head's bytes, to refuse connections past ``server.max_connections``, and to answer aiohttp's
own parse errors as JSON. :class:`LimitedRunner` is ``web.AppRunner`` serving through it. It
relies on aiohttp internals, exercised by tests with both of aiohttp's parsers: the queue of
parsed messages (``RequestHandler._messages``), the request loop's calls per request
(``_handle_request``, then ``finish_response``, which calls ``log_access`` once the answer is
written), the server's handler kwargs (``_kwargs``) and ``AppRunner._make_server``;
pyproject.toml pins aiohttp to the minor version tested with.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server

from proxy.config import ServerConfig
from proxy.core.errors import (
    BadHost,
    BadRequest,
    BodyTimeout,
    HeadersTooLarge,
    HeaderTimeout,
    MethodNotAllowed,
    ProxyError,
    TooManyConnections,
)
from proxy.edge.frame import json_error
from proxy.edge.keys import METRICS
from proxy.edge.limits import ALLOWED_METHODS, EdgeLimits, body_deadline, raw_answer

log = logging.getLogger("batchgate")

#: How long a connection batchgate ended keeps draining what the caller still sends, so its
#: answer is read rather than reset away (see LimitedHandler._linger).
LINGER_S = 2.0
#: The HTTP versions served; aiohttp's parsers also take 0.9 and 2.0 request lines.
_VERSIONS = frozenset({(1, 0), (1, 1)})

# The phases of one connection (plain ints: compared on every chunk).
_HEAD = 0  # a head is arriving (or awaited on a fresh connection): the header deadline runs
_PARSED = 1  # the head is complete; its handler has not started yet
_BODY = 2  # a handler started and its body is still arriving: the body deadline runs
_HANDLING = 3  # the body is in (or there is none); the handler is working or answering
_IDLE = 4  # between requests on a kept-alive connection: aiohttp's keep-alive timer runs
_CUT = 5  # refused or timed out: whatever still arrives is dropped unread


# aiohttp's methods that LimitedHandler's run on every request hand on to (see data_received).
_base_data_received = RequestHandler.data_received
_base_handle_request = RequestHandler._handle_request
_base_finish_response = RequestHandler.finish_response
_base_log_access = RequestHandler.log_access


class LimitedHandler(RequestHandler):
    """aiohttp's protocol for one caller connection, with the deadlines and size limits of
    :class:`EdgeLimits` (:mod:`proxy.edge.limits` says what each one guarantees)."""

    __slots__ = (
        "_admitted", "_deadline", "_head_bytes", "_head_tail", "_in_handler", "_limits",
        "_lingering", "_payload", "_phase", "_timer", "_timer_at",
    )

    def __init__(self, manager: Server, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._phase = _HEAD
        self._admitted = False
        self._in_handler = False
        self._head_bytes = 0
        self._head_tail = b""  # the last 3 bytes of a head still arriving
        self._deadline = 0.0  # the header deadline, or the end of the head (body phase)
        self._payload: StreamReader | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._lingering: asyncio.Transport | None = None

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self._limits
        if limits.open >= limits.max_connections:
            # Refused before aiohttp sees it: no task, no parser work, nothing parsed.
            limits.count(TooManyConnections.reason)
            assert isinstance(transport, asyncio.Transport)
            self._linger(transport, limits.too_many_answer)
            return
        limits.open += 1
        self._admitted = True
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._limits.open -= 1
        self._phase = _CUT
        if self._lingering is not None:
            self._limits.lingering.discard(self._lingering)
            self._lingering = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # The body stream holds its protocol: kept, the pair would be a cycle per connection
        # that only the cycle collector frees (a 45 ms gen-2 pause with 500 streams).
        self._payload = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # aiohttp's own through a module-level name: super() costs an object per call.
        phase = self._phase
        if phase in (_HANDLING, _PARSED) or not data:
            # b"": aiohttp re-parsing what it buffered while reading was paused.
            _base_data_received(self, data)
            return
        if phase == _BODY:
            _base_data_received(self, data)
            payload = self._payload
            if payload is not None and payload.is_eof():
                self._phase = _HANDLING if self._in_handler else _IDLE
            return
        if phase == _CUT:
            return
        if phase == _IDLE:  # the next request's first bytes: _start_head, inline
            self._phase = _HEAD
            self._head_bytes = 0
            self._head_tail = b""
            deadline = self._deadline = self._loop.time() + self._limits.header_timeout_s
            if self._timer is None or self._timer_at > deadline:
                self._arm(deadline)
        size = self._head_bytes + len(data)
        self._head_bytes = size
        limit = self._limits.max_header_bytes
        if size > limit and not self._head_ends_by(limit - size + len(data), data):
            # Nothing of this chunk reached the parser, so no request from it can be queued
            # behind the answer.
            self._limits.count(HeadersTooLarge.reason)
            self._cut(self._limits.headers_too_large_answer)
            return
        queued = len(self._messages)
        _base_data_received(self, data)
        if len(self._messages) != queued:
            self._phase = _PARSED
        else:  # a head in pieces: keep what a terminator split across two reads needs
            self._head_tail = data[-3:] if len(data) >= 3 else (self._head_tail + data)[-3:]

    def _head_ends_by(self, budget: int, data: bytes) -> bool:
        """Whether the head's blank line ends within the first ``budget`` bytes of ``data``
        (it may have begun in the previous read). Only run when a head reaches the limit."""
        tail = self._head_tail
        return (tail + data).find(b"\r\n\r\n", 0, len(tail) + max(budget, 0)) >= 0

    # -- requests ----------------------------------------------------------------------------
    #
    # aiohttp's request loop calls _handle_request, then finish_response, then log_access for
    # each request. The checks hook into all three as plain calls that hand aiohttp's own
    # coroutine on: no coroutine of ours wraps the handler (one more frame per request costs
    # about 2 % of a small request's instructions, measured with callgrind).

    def _handle_request(
        self,
        request: BaseRequest,
        start_time: float | None,
        request_handler: Callable[[BaseRequest], Awaitable[StreamResponse]],
    ) -> Coroutine[Any, Any, tuple[StreamResponse, bool]]:
        """Before the application sees a request (in aiohttp's loop, before its task): start
        the body deadline, and swap the application for a refusal when a limit says so."""
        if request_handler is self._request_handler:  # else aiohttp's own error answer
            self.request_started(request)
            refusal = self._refusal(request)
            if refusal is not None:
                request_handler = refusal
        return _base_handle_request(self, request, start_time, request_handler)

    def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[StreamResponse, bool]]:
        """The handler is done (its answer not yet sent): a body cut short makes it the last."""
        if self._in_handler and self.request_ended():
            resp.force_close()
        return _base_finish_response(self, request, resp, start_time)

    def log_access(
        self, request: BaseRequest, response: StreamResponse, time: float | None
    ) -> None:
        """Called by aiohttp once an answer is written (or its write failed)."""
        if self._phase == _CUT:  # this answer refused the request or cut its body
            self._linger(self.transport, b"")
        _base_log_access(self, request, response, time)

    def _refusal(
        self, request: BaseRequest
    ) -> Callable[[BaseRequest], Awaitable[StreamResponse]] | None:
        """The handler that answers ``request`` with a refusal instead of the application,
        or None (the common case)."""
        limits = self._limits
        if request.version not in _VERSIONS:
            # aiohttp's parsers take "HTTP/0.9" and "HTTP/2.0" request lines, and its answer
            # would echo the version in a status line no caller can read: refused with a
            # whole HTTP/1.1 answer of our own, never forwarded (found by the fuzz).
            version = "HTTP/{}.{}".format(*request.version)
            unsupported = BadRequest(
                f"{version} is not supported: batchgate speaks HTTP/1.0 and HTTP/1.1")
            assert unsupported.reason is not None
            limits.count(unsupported.reason)
            self.refuse_raw(raw_answer(unsupported))
            return _answer_with(StreamResponse(status=unsupported.status))
        err = limits.refusal(request)
        if err is None:
            return None
        assert err.reason is not None
        limits.count(err.reason)
        self.refuse()
        response = json_error(err)
        if isinstance(err, MethodNotAllowed):
            response.headers["Allow"] = ALLOWED_METHODS
        response.force_close()
        return _answer_with(response)

    def request_started(self, request: BaseRequest) -> None:
        self._in_handler = True
        payload = request.content
        self._payload = payload
        if payload.is_eof():
            self._phase = _HANDLING
            return
        self._phase = _BODY
        now = self._loop.time()
        self._deadline = now  # the end of the head, for body_deadline()
        self._arm(now + self._limits.body_timeout_s)

    def request_ended(self) -> bool:
        """True when the body timed out: the answer must end the connection."""
        self._in_handler = False
        phase = self._phase
        if phase == _HANDLING:
            self._phase = _IDLE
            return False
        # _BODY: answered before the body was in (a route that ignores it); aiohttp reads
        # and drops the rest, bounded by the body deadline.
        return phase == _CUT

    # -- errors aiohttp's parser found --------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """aiohttp answers a malformed request in plain text; batchgate answers like an API."""
        if status != 400:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is under way: no room for an error answer")
        self._phase = _CUT
        err: ProxyError
        text = exc.message if isinstance(exc, BadHttpMessage) else message or "malformed"
        if "'Host' header" in text:  # aiohttp's own check: missing, or repeated
            err = BadHost(f"invalid Host header: {text}")
        elif isinstance(exc, LineTooLong) or "Too many headers" in text:
            err = HeadersTooLarge(
                f"the request head is over server.max_header_bytes "
                f"({self._limits.max_header_bytes}) or server.max_headers "
                f"({self._limits.max_headers})")
        else:
            err = BadRequest(f"malformed HTTP request: {text}")
        log.debug("refused a malformed request from %s: %s", request.remote, exc)
        assert err.reason is not None
        self._limits.count(err.reason)
        response = json_error(err)
        response.force_close()
        return response

    # -- the one timer --------------------------------------------------------------------

    def _start_head(self) -> None:
        self._phase = _HEAD
        self._head_bytes = 0
        self._head_tail = b""
        self._deadline = self._loop.time() + self._limits.header_timeout_s
        self._arm(self._deadline)

    def _arm(self, when: float) -> None:
        """Make the timer fire by ``when``. A later deadline leaves a pending timer alone: it
        fires early and re-arms itself (so a kept-alive connection rarely touches it)."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        phase = self._phase
        limits = self._limits
        if phase == _HEAD:
            deadline = self._deadline
        elif phase == _BODY:
            payload = self._payload
            if payload is None or payload.is_eof():
                self._phase = _HANDLING if self._in_handler else _IDLE
                return
            deadline = body_deadline(self._deadline, payload.total_bytes,
                                     limits.body_timeout_s, limits.min_body_rate)
        elif phase == _CUT:
            if self._lingering is not None:  # the caller never closed its side: enough
                self._lingering.close()
            return
        else:
            return  # nothing of ours is timed in this phase
        if self._loop.time() < deadline:
            self._arm(deadline)
            return
        if phase == _HEAD:
            if self._head_bytes:
                limits.count(HeaderTimeout.reason)
                self._cut(limits.header_timeout_answer)
            else:  # nothing sent, nothing to answer
                self._cut(b"")
            return
        assert self._payload is not None
        if not self._in_handler:
            self._cut(b"")  # answered already; aiohttp was reading the rest to drop it
            return
        # The handler reading the body gets the error (the frame answers 408 and counts
        # it); request_ended then makes that answer the connection's last.
        self._phase = _CUT
        self._payload.set_exception(BodyTimeout(
            f"the request body did not arrive within server.body_timeout_s "
            f"({limits.body_timeout_s:g} s) plus 1 s per server.min_body_rate "
            f"({limits.min_body_rate:g}) bytes"))

    def _cut(self, answer: bytes) -> None:
        self._linger(self.transport, answer)

    def _linger(self, transport: asyncio.Transport | None, answer: bytes) -> None:
        """Answer, then end the connection without losing that answer.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the answer before the caller reads it (a trickler is still sending). So, as nginx's
        lingering close does: send the answer and our FIN, drop whatever still arrives, and
        close when the caller closes its side or after ``LINGER_S``.
        """
        self._phase = _CUT
        self.transport = None  # the linger owns it now: aiohttp neither writes nor closes it
        self.force_close()  # ends aiohttp's request loop for this connection
        if transport is None or transport.is_closing():
            return
        if answer:
            transport.write(answer)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._lingering = transport
        self._limits.lingering.add(transport)
        if self._timer is not None:  # a deadline of a phase that is over
            self._timer.cancel()
            self._timer = None
        self._arm(self._loop.time() + LINGER_S)

    def refuse(self) -> None:
        """The request is answered with a refusal: that answer is the connection's last."""
        self._phase = _CUT

    def refuse_raw(self, answer: bytes) -> None:
        """Refuse with ``answer`` written as it is (an HTTP/1.1 status line whatever the
        request's version), then end the connection; aiohttp's own answer finds no
        transport and is dropped (``finish_response`` treats that as a caller gone)."""
        self._cut(answer)


class _LimitedServer(Server):
    """aiohttp's connection factory, making :class:`LimitedHandler`s."""

    def __init__(self, base: Server, limits: EdgeLimits, kwargs: dict[str, Any]) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self.limits = limits

    def __call__(self) -> RequestHandler:
        return LimitedHandler(self, self.limits, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        for transport in list(self.limits.lingering):
            transport.close()
        super().pre_shutdown()


def _answer_with(
    response: StreamResponse,
) -> Callable[[BaseRequest], Awaitable[StreamResponse]]:
    """A handler that answers with ``response`` (a refusal, built before the handler runs)."""

    async def answer(_request: BaseRequest) -> StreamResponse:
        return response

    return answer


class LimitedRunner(web.AppRunner):
    """``web.AppRunner`` serving through :class:`LimitedHandler` with ``server``'s limits.

    aiohttp's own limits are set to match: keep-alive time, and any one head line (request
    line or header) at most ``max_header_bytes``. aiohttp's header count is set above ours
    (its two parsers count differently); ours is exact, checked per request.
    """

    __slots__ = ("_server_config",)

    def __init__(self, app: web.Application, server: ServerConfig, **kwargs: Any) -> None:
        kwargs.update(
            keepalive_timeout=server.keepalive_timeout_s,
            max_line_size=server.max_header_bytes,
            max_field_size=server.max_header_bytes,
            max_headers=server.max_headers + 2,
        )
        super().__init__(app, **kwargs)
        self._server_config = server

    @property
    def limits(self) -> EdgeLimits:
        server = self.server
        assert isinstance(server, _LimitedServer), "limits exist once the runner is set up"
        return server.limits

    async def _make_server(self) -> Server:
        base = await super()._make_server()
        limits = EdgeLimits(self._server_config, self.app[METRICS])
        return _LimitedServer(base, limits, base._kwargs)
