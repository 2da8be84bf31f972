"""Limits on callers: how long a request may take to arrive, how big its head may be, how many
connections may be open, and which requests are refused before any handler sees them.

aiohttp's server bounds only idle keep-alive time: a caller trickling its head or its body one
byte a second holds a connection (and a task) for as long as it likes. HAProxy's
``timeout http-request``, nginx's ``client_header_timeout``/``client_body_timeout`` and
Apache's mod_reqtimeout exist for that; this module gives batchgate the same, in a subclass
of aiohttp's protocol, whichever HTTP parser (llhttp or the pure-Python one) is active:

- ``server.header_timeout_s``: the whole head (request line and headers) must arrive within
  it, counted from the connection's start or, on a kept-alive connection, from the first
  byte of the next request. A head cut short gets 408; a connection that sent nothing is
  just closed (it is waiting for no answer: a browser's pre-connect, an idle client).
- ``server.body_timeout_s`` and ``server.min_body_rate``: the body must have arrived by the end
  of the head plus ``body_timeout_s``, plus one second for every ``min_body_rate`` bytes received
  so far (mod_reqtimeout's ``body=20,MinRate=500``): a silent or trickling body gets 408, an
  upload at any real rate is never cut.
- ``server.max_header_bytes`` (the head as a whole, and any one line of it) and
  ``server.max_headers``: 431.
- ``server.max_connections``: a connection past it gets 503 and is closed at once, unread.
- ``TRACE`` and ``CONNECT``: 405; an invalid ``Host``: 400. Never forwarded.

This module is the policy (what is refused, with which answer); :mod:`proxy.edge.protocol`
applies it to aiohttp's connections.

Hot path: one timer per connection (``loop.call_at``), re-armed only when it fires early, never
per chunk; per request a phase change, a method, header-count and Host check. The deadline of
a body is read off its payload's byte count when the timer fires, not tracked per chunk.
"""

from __future__ import annotations

import asyncio
import json
import re
from http import HTTPStatus

from aiohttp.web_request import BaseRequest
from multidict import istr

from proxy.config import ServerConfig
from proxy.core.errors import (
    BadHost,
    HeadersTooLarge,
    HeaderTimeout,
    MethodNotAllowed,
    ProxyError,
    TooManyConnections,
    error_body,
)
from proxy.observe.metrics import Metrics

#: Never forwarded: TRACE would reflect the caller's headers (credentials included) back
#: from the replica; CONNECT would make batchgate a tunnel to anywhere.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
#: What a 405 names in ``Allow`` (RFC 9110 15.5.6): everything else is forwarded.
ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
#: RFC 9112 3.2 / RFC 3986 3.2.2: a reg-name or IPv4 address, or an [IPv6] literal, then an
#: optional port. No space, no userinfo ("user@host"), nothing a log or a replica could misread.
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
#: Distinct valid Host values remembered (see EdgeLimits.refusal); past it, forgotten at once.
_GOOD_HOSTS_MAX = 256
_HOST_KEY = istr("Host")  # folded once: a plain str is folded on every lookup


def host_problem(request: BaseRequest) -> str | None:
    """Why the request's ``Host`` is unacceptable (RFC 9112 3.2), or None."""
    hosts = request.headers.getall("Host", ())
    if not hosts:
        return "a Host header is required on HTTP/1.1" if request.version >= (1, 1) else None
    if len(hosts) > 1:
        return "more than one Host header"
    host = hosts[0]
    if not host:
        return "an empty Host header" if request.version >= (1, 1) else None
    if not _HOST.fullmatch(host):
        return "Host must be host[:port], with no space or user@"
    return None


def body_deadline(head_end: float, received: int, body_timeout_s: float, min_rate: float) -> float:
    """When a body that has delivered ``received`` bytes so far is late (mod_reqtimeout)."""
    extension = received / min_rate if min_rate > 0 else 0.0
    return head_end + body_timeout_s + extension


def raw_answer(err: ProxyError) -> bytes:
    """A whole ``Connection: close`` answer for a connection with no request object to answer
    through (a head that never completed, a connection refused at the door)."""
    body = json.dumps(error_body(err)).encode()
    head = (
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        + (f"Retry-After: {err.retry_after_s}\r\n" if err.retry_after_s is not None else "")
        + "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class EdgeLimits:
    """The limits of one listener and what they share: the count of open connections.

    Invariant: ``open`` is the number of admitted connections not yet lost; every admission in
    ``connection_made`` is paired with one release in ``connection_lost``.
    """

    __slots__ = (
        "_good_hosts",
        "body_timeout_s",
        "header_timeout_answer",
        "header_timeout_s",
        "headers_too_large_answer",
        "lingering",
        "max_connections",
        "max_header_bytes",
        "max_headers",
        "metrics",
        "min_body_rate",
        "open",
        "too_many_answer",
    )

    def __init__(self, server: ServerConfig, metrics: Metrics) -> None:
        self.header_timeout_s = server.header_timeout_s
        self.body_timeout_s = server.body_timeout_s
        self.min_body_rate = server.min_body_rate
        self.max_connections = server.max_connections
        self.max_header_bytes = server.max_header_bytes
        self.max_headers = server.max_headers
        self.metrics = metrics
        self.open = 0
        # Connections in their lingering close (refused ones too, which aiohttp never saw):
        # closed at once on shutdown, so none outlives the listener.
        self.lingering: set[asyncio.Transport] = set()
        self._good_hosts: set[str] = set()  # Host values that passed host_problem
        # Built once: these answers are written under attack, when cheap matters most.
        self.header_timeout_answer = raw_answer(HeaderTimeout(
            f"the request head did not arrive within server.header_timeout_s "
            f"({server.header_timeout_s:g} s)"))
        self.too_many_answer = raw_answer(TooManyConnections(
            f"batchgate has server.max_connections ({server.max_connections}) connections "
            f"open", retry_after_s=1))
        self.headers_too_large_answer = raw_answer(HeadersTooLarge(
            f"the request head is over server.max_header_bytes ({server.max_header_bytes})"))

    def count(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    def refusal(self, request: BaseRequest) -> ProxyError | None:
        """The error to answer instead of handling ``request``, or None (the common case)."""
        if request.method in REFUSED_METHODS:
            return MethodNotAllowed(f"{request.method} is not allowed through batchgate")
        if len(request.raw_headers) > self.max_headers:
            return HeadersTooLarge(
                f"the request has {len(request.raw_headers)} header fields, over "
                f"server.max_headers ({self.max_headers})")
        # Callers send the same few Host values over and over: once one has passed the whole
        # check, a set lookup does (a repeated Host never gets this far: aiohttp's parsers
        # refuse it, and host_problem checks it again for every value not seen yet).
        if request.headers.get(_HOST_KEY) in self._good_hosts:
            return None
        problem = host_problem(request)
        if problem is not None:
            return BadHost(f"invalid Host header: {problem}")
        host = request.headers.get(_HOST_KEY)
        if host:  # an absent or empty one is fine on HTTP/1.0 only: not remembered
            if len(self._good_hosts) >= _GOOD_HOSTS_MAX:
                self._good_hosts.clear()  # bounded, whatever values callers make up
            self._good_hosts.add(host)
        return None

    def __repr__(self) -> str:
        return f"<EdgeLimits open={self.open}/{self.max_connections}>"
