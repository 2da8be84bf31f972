"""How a replica's answer that is not a 200 event stream becomes the open stream's last event."""

from __future__ import annotations

import json

import pytest

from proxy.edge.heartbeat import comment, replica_error


def event_error(event: bytes) -> object:
    head, data = event.split(b"\n", 1)
    assert head == b"event: error" and data.startswith(b"data: ") and data.endswith(b"\n\n")
    return json.loads(data[len(b"data: "):])["error"]


def test_a_heartbeat_is_an_sse_comment_with_the_position() -> None:
    assert comment(7) == b": queued position=7\n\n"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # OpenAI's envelope (and current vLLM's): kept as it is.
        (b'{"error": {"message": "max_tokens is too large", "type": "invalid_request_error",'
         b' "param": "max_tokens", "code": "context_length_exceeded"}}',
         {"message": "max_tokens is too large", "type": "invalid_request_error", "param": None,
          "code": "context_length_exceeded"}),
        # Older vLLM: a flat object with an integer code.
        (b'{"object": "error", "message": "bad model", "type": "NotFoundError", "param": null,'
         b' "code": 404}',
         {"message": "bad model", "type": "NotFoundError", "param": None, "code": "404"}),
        # Not JSON at all: the status, and the start of the body.
        (b"<html>Bad Gateway</html>",
         {"message": "replica r answered 502: <html>Bad Gateway</html>",
          "type": "upstream_error", "param": None, "code": "upstream_status_502"}),
        (b"", {"message": "replica r answered 502", "type": "upstream_error", "param": None,
               "code": "upstream_status_502"}),
    ],
)
def test_the_replica_error_object_is_kept_or_made_up(body: bytes, expected: object) -> None:
    assert event_error(replica_error(502, body, "r")) == expected
