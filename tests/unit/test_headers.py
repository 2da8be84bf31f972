"""Header and target policy at the edge, without sockets."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from proxy.edge.headers import downstream_response_headers, origin_form


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
