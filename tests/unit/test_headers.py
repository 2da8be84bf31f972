"""Header and target policy at the edge, without sockets."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import example, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.edge.headers import (
    HOP_BY_HOP,
    _strip_hop_by_hop,
    downstream_response_headers,
    origin_form,
)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/v1/completions", "/v1/completions"),
        ("/v1/completions?stream=true&x=%20", "/v1/completions?stream=true&x=%20"),
        ("http://u:p@h:1/v1/models?x=1", "/v1/models?x=1"),
        ("/a/../v1/./models", "/v1/models"),
        ("/a/b/..", "/a/"),
        ("/../../etc", "/etc"),
        ("/v1/%2e%2E/x", "/x"),
        ("/v1/x%2Fy", "/v1/x%2Fy"),
        ("/v1/models#f", "/v1/models"),
        ("/.well-known/x", "/.well-known/x"),
    ],
)
def test_origin_form(target: str, expected: str) -> None:
    assert origin_form(make_mocked_request("GET", target)) == expected


def test_content_length_is_dropped_next_to_transfer_encoding() -> None:
    upstream = CIMultiDict([("Transfer-Encoding", "chunked"), ("Content-Length", "5"),
                            ("Content-Type", "application/json")])
    headers = downstream_response_headers(upstream, "rid")
    assert "Content-Length" not in headers and "Transfer-Encoding" not in headers
    assert headers["Content-Type"] == "application/json" and headers["X-Request-Id"] == "rid"


def test_request_ids_do_not_repeat_when_the_global_random_is_seeded() -> None:
    """hypothesis (and any library) may seed the global ``random``: ids must not follow it."""
    import random

    from proxy.edge.frame import new_request_id

    random.seed(7)
    first = new_request_id()
    random.seed(7)
    assert new_request_id() != first


def _strip_reference(headers: CIMultiDict[str]) -> list[tuple[str, str]]:
    """RFC 9110 7.6.1 field by field: what crosses the proxy (the loop the edge used to run)."""
    named = {token.strip().lower() for value in headers.getall("Connection", ())
             for token in value.split(",")}
    return [(k, v) for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in named
            and not k.lower().startswith("proxy-")]


_NAMES = ["Content-Type", "content-length", "X-Request-Id", "Connection", "connection",
          "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Connection",
          "proxy-authorization", "Proxy-Foo", "X-Proxy-Foo", "Teapot", "Trailers", "X-Custom",
          "x-custom", "Cache-Control", "Upgrade-Insecure-Requests", "Proxy", "Keep-Alive-X"]
_VALUES = ["close", "keep-alive", "X-Custom", " x-custom , Cache-Control", "", "chunked",
           "Upgrade,  TE", "a, , b", "text/event-stream"]


@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=12))
@example([("Connection", " x-custom , Cache-Control"), ("X-Custom", "1"), ("Cache-Control", "a"),
          ("Content-Type", "text/plain")])
@example([("Proxy-Foo", "1"), ("X-Proxy-Foo", "2"), ("Teapot", "3"), ("TE", "trailers"),
          ("Keep-Alive-X", "4"), ("Transfer-Encoding", "chunked")])
def test_hop_by_hop_fields_and_those_connection_names_never_cross(
    fields: list[tuple[str, str]],
) -> None:
    headers = CIMultiDict(fields)
    assert list(_strip_hop_by_hop(headers).items()) == _strip_reference(headers)
