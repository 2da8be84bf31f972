"""The upstream call and the byte-for-byte passthrough of its answer.

Bodies pass through untouched: the request body is sent as received, the response body is
written to the caller chunk by chunk as it arrives (SSE events are never held back or merged
by us), with ``auto_decompress=False`` so a ``Content-Encoding`` stays intact. When the caller
goes away, the upstream connection is closed, not returned to the pool: vLLM and TGI abort a
generation when their client disconnects, and a GPU must not generate for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import UpstreamConfig
from proxy.core.errors import UpstreamError, UpstreamTimeout
from proxy.core.replicas import Replica
from proxy.observe.exchange import Exchange
from proxy.observe.usage import UsageTail
from proxy.upstream.connection import (
    ConnectionPool,
    NotDeliveredError,
    Response,
    UpstreamClosedError,
    UpstreamConnectError,
    UpstreamTimeoutError,
)

#: RFC 9110 7.6.1 hop-by-hop fields, plus the legacy ones proxies must not forward either.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
        "proxy-connection", "proxy-authenticate", "proxy-authorization",
    }
)
#: Set by aiohttp's client when absent; the caller did not send them, so neither do we.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    # Fields named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
            continue
        out.add(key, value)
    return out


def upstream_request_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    headers = _strip_hop_by_hop(request.headers)
    # The pool sets Host for the replica's address and Content-Length for the body it sends;
    # the body is complete before it is sent, so a caller's Expect is answered already.
    for name in ("Host", "Content-Length", "Expect"):
        headers.popall(name, None)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    if request.host:
        headers["X-Forwarded-Host"] = request.host
    headers["X-Request-Id"] = request_id
    return list(headers.items())


def downstream_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str], request_id: str
) -> CIMultiDict[str]:
    headers = _strip_hop_by_hop(upstream)
    if "Transfer-Encoding" in upstream:
        # The body was framed by chunking and is re-framed for the caller: a Content-Length
        # sent alongside is not its length (RFC 9112 6.3).
        headers.popall("Content-Length", None)
    headers["X-Request-Id"] = request_id
    return headers


class _CoalescingResponse(web.StreamResponse):
    """Sends its headers together with the first body chunk: one write instead of two.

    Only for answers that are not event streams: a stream's headers go out at once, so its
    caller knows it was accepted before the first token.
    """

    # aiohttp's own web.Response does the same; StreamResponse flushes headers in prepare().
    _send_headers_immediately = False


class NotDelivered(Exception):
    """The request never reached the replica, so it may be sent again elsewhere."""

    def __init__(self, kind: str, detail: str, *, replica_down: bool) -> None:
        super().__init__(detail)
        self.kind = kind
        self.replica_down = replica_down


class Upstreams:
    """One keep-alive connection pool per replica, sized to its concurrency.

    The pool is batchgate's own lean HTTP/1.1 client (:mod:`proxy.upstream.connection`): the
    proxy's upstream hop needs exactly one behaviour (send these bytes, stream those back)
    and aiohttp's general-purpose client cost more CPU per request than all of batchgate's
    own logic. A request whose pooled connection turned out to be closed by the replica goes
    out again with ``fresh=True``, on a connection of its own.
    """

    def __init__(self, replicas: tuple[Replica, ...], config: UpstreamConfig) -> None:
        self._config = config
        self._pools = {
            replica.name: ConnectionPool(
                replica.url,
                # A slot per request, and a fresh connection may briefly overlap a pooled one
                # the replica is closing: twice the slots is the hard ceiling, never reached.
                limit=2 * replica.max_concurrency,
                connect_timeout_s=config.connect_timeout_s,
                read_timeout_s=config.read_timeout_s,
            )
            for replica in replicas
        }

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()

    async def send(
        self,
        replica: Replica,
        request: web.BaseRequest,
        body: bytes,
        headers: list[tuple[str, str]],
        *,
        fresh: bool,
    ) -> Response:
        """Send the request; return once the replica's status line and headers are in.

        Raises :class:`NotDelivered` when the request certainly never reached the replica
        (refused or timed-out connect; a pooled connection the replica had already closed),
        and :class:`UpstreamError` for failures after it may have.
        """
        pool = self._pools[replica.name]
        try:
            return await pool.request(request.method, request.raw_path, headers, body,
                                      fresh=fresh)
        except NotDeliveredError as err:
            if err.kind == "connect":
                raise NotDelivered("connect", str(err), replica_down=True) from err
            # The replica had closed this idle keep-alive connection before our request got
            # there (llama.cpp's server does so after every stream): not the replica's fault.
            raise NotDelivered("reset", f"stale pooled connection: {err}",
                               replica_down=False) from err
        except UpstreamTimeoutError as err:
            raise UpstreamTimeout(
                f"replica {replica.name} sent no response within "
                f"{self._config.read_timeout_s:g}s",
                kind="timeout",
                replica=replica.name,
            ) from err
        except (UpstreamClosedError, UpstreamConnectError, OSError) as err:
            raise UpstreamError(
                f"replica {replica.name} closed the connection: {err}",
                kind="reset", replica=replica.name,
            ) from err


#: A write that may fill the caller's socket buffer (the transport pauses at 64 KiB and the
#: write then waits for the caller) is bounded by the stall limit; smaller ones never wait.
_STALL_CHECK_BYTES = 16 * 1024


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """A last SSE event that OpenAI SDKs raise as an APIError instead of ending silently."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"


def is_event_stream(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").startswith("text/event-stream")


async def pipe(
    request: web.BaseRequest,
    upstream: Response,
    exchange: Exchange,
    *,
    is_cut: Callable[[], bool],
    on_gap: Callable[[float], None],
    stall_limit_s: float,
) -> web.StreamResponse:
    """Relay status, headers and body as they arrive; the caller closes ``upstream``.

    Each chunk is written to the caller first; only then is it looked at (the usage tail,
    the gap since the previous chunk of an event stream), so observation never delays bytes.
    Returns normally when the caller hung up mid-body (``exchange.client_gone``) or the
    replica failed mid-body (``exchange.upstream_error``): headers are sent by then, so
    there is no error status left to give, only a connection to close.
    """
    sse = is_event_stream(upstream.headers)
    response_class = web.StreamResponse if sse else _CoalescingResponse
    response = response_class(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_response_headers(upstream.headers, exchange.request_id))
    tail = exchange.usage = UsageTail()
    clock = time.monotonic
    try:
        await response.prepare(request)
        exchange.prepared = True
        while True:
            try:
                chunk = await upstream.readany()
            except UpstreamTimeoutError as err:
                return await _upstream_failed(request, response, exchange, sse, "timeout", err)
            except (UpstreamClosedError, OSError) as err:
                return await _upstream_failed(request, response, exchange, sse, "reset", err)
            if not chunk:
                break
            now = clock()  # when it arrived, not when the caller took it
            transport = request.transport
            if transport is not None and (
                transport.get_write_buffer_size() + len(chunk) > _STALL_CHECK_BYTES
            ):
                # The caller's socket is full. A caller that stays connected but stops
                # reading would hold its slot (and the engine) forever: bound the wait.
                try:
                    async with asyncio.timeout(stall_limit_s):
                        await response.write(chunk)
                except TimeoutError:
                    exchange.client_gone = True
                    transport.close()
                    return response
            else:
                await response.write(chunk)
            if exchange.last_byte_at is None:
                exchange.first_byte_at = now
                exchange.stage = "streaming"
            elif sse:
                on_gap(now - exchange.last_byte_at)
            exchange.last_byte_at = now
            tail.feed(chunk)
        exchange.stage = "done"
        await response.write_eof()
    except ConnectionResetError:
        exchange.client_gone = True
    except asyncio.CancelledError:
        if is_cut() and sse and exchange.prepared:
            # Shutdown's deadline passed mid-stream: say so in the stream's own protocol.
            await _end_stream_with_error(
                response,
                sse_error_event("batchgate is shutting down; stream cut at the drain deadline",
                                "service_unavailable", "draining"),
            )
        raise
    return response


async def _upstream_failed(
    request: web.BaseRequest,
    response: web.StreamResponse,
    exchange: Exchange,
    sse: bool,
    kind: str,
    err: BaseException,
) -> web.StreamResponse:
    exchange.upstream_error = kind
    if sse:
        # An event stream can say what happened in its own protocol, then end cleanly: the
        # error event is explicit, so nobody mistakes the stream for complete.
        message = f"replica {exchange.replica} failed mid-stream ({kind}): {err}"
        await _end_stream_with_error(
            response, sse_error_event(message, "upstream_error", f"upstream_{kind}")
        )
    elif request.transport is not None:
        # Any other body: headers are gone, so cutting the connection is the only way to
        # make the truncation visible (an incomplete Content-Length or chunked body).
        request.transport.close()
    return response


async def _end_stream_with_error(response: web.StreamResponse, event: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await response.write(event)
        await response.write_eof()
