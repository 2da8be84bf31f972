"""Named failures of the proxy core, and their one mapping to HTTP.

The scheduler and the relay raise these; only the HTTP edge (``proxy.edge.app``) turns them into
status codes and OpenAI-style JSON bodies, so the core never needs to know about HTTP.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A request the proxy answers itself, without a replica's response."""

    status: int = 500
    type: str = "server_error"
    #: The ``reason`` label of ``batchgate_rejected_requests_total`` (None: not a rejection).
    reason: str | None = None

    def __init__(
        self, message: str, *, retry_after_s: int | None = None, waited: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        #: The request waited in the queue before this (it belongs in the queue-wait series).
        self.waited = waited

    @property
    def code(self) -> str:
        return self.reason or self.type


class QueueFull(ProxyError):
    """The bounded queue has no room: shed load now rather than queue without bound."""

    status = 429
    type = "rate_limit_error"
    reason = "queue_full"


class QueueTimeout(ProxyError):
    """A request waited ``queue.timeout_s`` for a slot and got none."""

    status = 503
    type = "service_unavailable"
    reason = "queue_timeout"


class DeadlineUnreachable(ProxyError):
    """The request cannot start before its deadline (``queue.timeout_s`` or the caller's
    ``X-Batchgate-Deadline-Ms``) at the measured drain rate: refused now, not at the deadline."""

    status = 429
    type = "rate_limit_error"
    reason = "deadline_unreachable"


class ModelNotFound(ProxyError):
    """No replica serves the request's ``model``: 404 at once, without a slot or a wait."""

    status = 404
    type = "invalid_request_error"
    reason = "model_not_found"

    def __init__(self, model: str, *, waited: bool = False) -> None:
        super().__init__(
            f"The model {model!r} is not served by any replica (GET /v1/models lists those "
            "that are)", waited=waited,
        )
        self.model = model


class RequestTooLarge(ProxyError):
    """The request's token cost is over the ``max_tokens_in_flight`` of every replica that
    serves its model: it could never be dispatched, so it is refused rather than left to wait."""

    status = 400
    type = "invalid_request_error"
    reason = "request_too_large"

    def __init__(
        self, cost: int, largest: int, model: str | None, *, waited: bool = False
    ) -> None:
        serving = "" if model is None else f" serving {model!r}"
        super().__init__(
            f"this request needs about {cost} tokens (its prompt estimate plus max_tokens), "
            f"more than the largest max_tokens_in_flight ({largest}) of the replicas{serving}; "
            "lower max_tokens or shorten the prompt", waited=waited,
        )
        self.cost = cost
        self.largest = largest


class NoHealthyReplica(ProxyError):
    """No replica could take the request (all failed their health checks)."""

    status = 503
    type = "service_unavailable"
    reason = "no_healthy_replica"


class Draining(ProxyError):
    """The proxy is shutting down and takes no new work."""

    status = 503
    type = "service_unavailable"
    reason = "draining"


class Overloaded(ProxyError):
    """batchgate itself ran out of a local resource (file descriptors): not a replica's fault.

    Shed like a full queue, but as 503: the caller should retry, ideally elsewhere.
    """

    status = 503
    type = "service_unavailable"
    reason = "overloaded"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    reason = "body_too_large"


class Unauthorized(ProxyError):
    """No API key, or not one of ``auth``'s (proxy.edge.auth); the message never holds it."""

    status = 401
    type = "invalid_request_error"
    reason = "unauthorized"

    @property
    def code(self) -> str:
        return "invalid_api_key"  # OpenAI's code, which SDKs raise as AuthenticationError


class HeaderTimeout(ProxyError):
    """The request head did not arrive within ``server.header_timeout_s``."""

    status = 408
    type = "invalid_request_error"
    reason = "header_timeout"


class BodyTimeout(ProxyError):
    """The body fell behind ``server.body_timeout_s`` and ``server.min_body_rate``."""

    status = 408
    type = "invalid_request_error"
    reason = "body_timeout"


class TooManyConnections(ProxyError):
    """``server.max_connections`` caller connections are open already."""

    status = 503
    type = "service_unavailable"
    reason = "too_many_connections"


class HeadersTooLarge(ProxyError):
    """The head is over ``server.max_header_bytes`` or has over ``server.max_headers`` fields."""

    status = 431
    type = "invalid_request_error"
    reason = "headers_too_large"


class BadHost(ProxyError):
    """A ``Host`` header that is missing or empty on HTTP/1.1, repeated, or not a host[:port]."""

    status = 400
    type = "invalid_request_error"
    reason = "bad_host"


class MethodNotAllowed(ProxyError):
    """``TRACE`` and ``CONNECT``: never forwarded (a proxy must not reflect or tunnel them)."""

    status = 405
    type = "invalid_request_error"
    reason = "method_not_allowed"


class InternalError(ProxyError):
    """A failure inside batchgate itself (a bug): still an OpenAI-style answer."""

    status = 500
    type = "server_error"

    @property
    def code(self) -> str:
        return "internal_error"


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    reason = "bad_request"


class UpstreamError(ProxyError):
    """The upstream hop failed: the one named failure for "the replica did not answer".

    ``kind`` says how (the ``kind`` label of ``batchgate_upstream_errors_total``): ``connect``
    (refused, unreachable, timed out, or the pool is closed), ``timeout`` (silent past
    ``upstream.read_timeout_s``), ``reset`` (the connection was lost), ``malformed`` (a
    response batchgate cannot relay faithfully). ``unsent`` is True only when the request
    certainly never reached the replica (not one byte of it was written), which is what
    makes a non-idempotent request safe to send again (:mod:`proxy.core.retry`).
    """

    status = 502
    type = "upstream_error"

    def __init__(
        self, message: str, *, kind: str, replica: str | None = None, unsent: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.replica = replica
        self.unsent = unsent

    @property
    def code(self) -> str:
        return f"upstream_{self.kind}"


class UpstreamTimeout(UpstreamError):
    """The replica went silent for ``upstream.read_timeout_s``: 504, not 502."""

    status = 504

    def __init__(self, message: str, *, replica: str | None = None) -> None:
        super().__init__(message, kind="timeout", replica=replica)


#: batchgate's own rejections of requests that never reached an engine: answered with
#: ``X-Batchgate-Rejected: <reason>`` (proxy.edge.frame), so a batchgate in front of this one
#: (a gateway before a sidecar) may send the request to another replica (proxy.core.retry).
UNDELIVERED_REASONS = frozenset({
    QueueFull.reason, QueueTimeout.reason, NoHealthyReplica.reason, Draining.reason,
    DeadlineUnreachable.reason,
})


def error_body(err: ProxyError) -> dict[str, dict[str, str | None]]:
    """The OpenAI error envelope, so SDKs surface our message as they would the engine's."""
    return {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
