"""Header policy at the edge: what crosses the proxy in each direction, and what it adds."""

from __future__ import annotations

import re

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

#: RFC 9110 7.6.1 hop-by-hop fields, plus the legacy ones proxies must not forward either.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
        "proxy-connection", "proxy-authenticate", "proxy-authorization",
    }
)


#: A hop-by-hop name (HOP_BY_HOP, any proxy-*) among lowercased names, each one between two
#: newlines: a field name is a token (both of aiohttp's parsers and llhttp refuse anything
#: else), so it holds no newline, and lowercasing it is ASCII's.
_HOP_NAMES = re.compile(
    r"\n(connection|keep-alive|te|trailer|transfer-encoding|upgrade|proxy-[^\n]*)(?=\n)"
)


def _strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    # A copy and one regex search over the names, in C: most requests carry no hop-by-hop
    # field at all (a Python loop over every field cost 5 % of a small request). Lowercased
    # first, the search starts only at newlines (its literal first character), not at every
    # character as an ignore-case multiline "^...$" does (4-7 k instructions less a call).
    out = CIMultiDict(headers)
    found = _HOP_NAMES.findall("\n" + "\n".join(headers.keys()).lower() + "\n")
    if found:
        # Fields named in Connection are hop-by-hop too (RFC 9110 7.6.1).
        named = {
            token.strip()
            for value in headers.getall("Connection", ())
            for token in value.split(",")
        }
        for name in {*found, *named}:
            out.popall(name, None)
    return out


#: Folded once (istr): a plain str name is folded again on every lookup.
_HOST, _CONTENT_LENGTH, _EXPECT, _FORWARDED_FOR, _FORWARDED_PROTO, _FORWARDED_HOST, _REQUEST_ID = (
    istr("Host"), istr("Content-Length"), istr("Expect"), istr("X-Forwarded-For"),
    istr("X-Forwarded-Proto"), istr("X-Forwarded-Host"), istr("X-Request-Id"),
)


def upstream_request_headers(request: web.BaseRequest, request_id: str) -> list[tuple[str, str]]:
    headers = _strip_hop_by_hop(request.headers)
    # The pool sets Host for the replica's address and Content-Length for the body it sends;
    # the body is complete before it is sent, so a caller's Expect is answered already.
    for name in (_HOST, _CONTENT_LENGTH, _EXPECT):
        headers.popall(name, None)
    peer = request.remote or ""
    prior = request.headers.get(_FORWARDED_FOR)
    headers[_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
    headers[_FORWARDED_PROTO] = request.scheme
    host = request.host
    if host:
        headers[_FORWARDED_HOST] = host
    headers[_REQUEST_ID] = request_id
    return list(headers.items())


#: Whole milliseconds the request waited for a slot (0: dispatched at once), on every answer
#: to a request that went through the queue, batchgate's own rejections included.
QUEUE_MS_HEADER = "X-Batchgate-Queue-Ms"
_QUEUE_MS, _TRANSFER_ENCODING = istr(QUEUE_MS_HEADER), istr("Transfer-Encoding")


def downstream_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str], request_id: str,
    queue_ms: int | None = None,
) -> CIMultiDict[str]:
    headers = _strip_hop_by_hop(upstream)
    if _TRANSFER_ENCODING in upstream:
        # The body was framed by chunking and is re-framed for the caller: a Content-Length
        # sent alongside is not its length (RFC 9112 6.3).
        headers.popall(_CONTENT_LENGTH, None)
    headers[_REQUEST_ID] = request_id
    if queue_ms is not None:
        # Replaces a batchgate's behind us: the caller is told this tier's wait.
        headers[_QUEUE_MS] = str(queue_ms)
    return headers


def _resolve_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on a raw path; ``%2E`` counts as ``.`` (as aiohttp decodes it)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        dots = segment.lower().replace("%2e", ".") if "%" in segment else segment
        if dots == "..":
            if out:
                out.pop()
        elif dots != ".":
            out.append(segment)
            continue
        if i == last:
            out.append("")  # "/a/b/.." is "/a/", not "/a"
    return "/" + "/".join(out)


def origin_form(request: web.BaseRequest) -> str:
    """The target a replica gets: path and query only (RFC 9112 3.2.1), dot-segments resolved.

    An absolute-form target (``GET http://user:pw@host/v1/models``) loses its scheme and
    authority, credentials included; a fragment is dropped. Percent-encoding is kept as
    received: the replica decodes it, not us.
    """
    raw = request.raw_path
    if raw[:1] == "/" and "/." not in raw and "#" not in raw and "%2" not in raw:
        return raw  # the common case, already origin-form: no URL parsing on the hot path
    if raw == "*":
        return raw  # OPTIONS *
    rel = request.rel_url
    path = _resolve_dot_segments(rel.raw_path or "/")
    query = rel.raw_query_string
    return f"{path}?{query}" if query else path


def with_origin_form(request: web.Request) -> web.Request:
    """``request`` itself if its target is origin-form already, else a clone that is, so
    routing, metrics, the access log and the replica all see the same path."""
    target = origin_form(request)
    if target == request.raw_path:
        return request
    return request.clone(rel_url=URL(target, encoded=True))
