"""The request's ``model``, for the access log: read from the body without parsing it.

The body is in memory already, but ``json.loads`` of a 100 KB chat request costs more than
the rest of the proxy's work on it. A JSON key ``"model"`` cannot occur inside a JSON string
(every quote in one is escaped), so finding the bytes ``"model"`` followed by ``:`` finds a
key; only a bounded part of the body is searched:

- the first :data:`HEAD_BYTES` (hand-written requests and most SDKs put ``model`` first),
- else the last :data:`TAIL_BYTES` (the OpenAI Python SDK sends ``messages`` first, then
  ``model`` and the small parameters).

Best effort, for operators, never for routing: a ``"model"`` key of a nested object found
before (or, in the tail, after) the top-level one is what gets logged; a value with escapes,
or longer than 256 characters, is logged as null.
"""

from __future__ import annotations

import re

HEAD_BYTES = 4096
TAIL_BYTES = 65536
_KEY = b'"model"'
_VALUE = re.compile(rb'\s*:\s*"([^"\\\x00-\x1f]{1,256})"')


def request_model(body: bytes) -> str | None:
    """The ``model`` a JSON request body names, or None (see the module's bounds)."""
    if body[:1] != b"{" and not body[:64].lstrip().startswith(b"{"):
        return None
    at = body.find(_KEY, 0, HEAD_BYTES)
    if at < 0 and len(body) > HEAD_BYTES:
        at = body.rfind(_KEY, max(HEAD_BYTES - len(_KEY), len(body) - TAIL_BYTES))
    if at < 0:
        return None
    match = _VALUE.match(body, at + len(_KEY))
    if match is None:
        return None
    return match.group(1).decode("utf-8", "replace")
