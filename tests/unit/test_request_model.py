"""The access log's `model`: read from the body's bytes, bounded, never by parsing it."""

from __future__ import annotations

import json

import pytest

from proxy.observe.model import HEAD_BYTES, TAIL_BYTES, request_model

PROMPT = 'she said "model": "not-this" to the \\"model\\" ' * 2000  # quotes escaped in JSON


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "llama-3", "prompt": "hi"}', "llama-3"),
        (b'  \n{"model":"m"}', "m"),
        (b'{"prompt": "x", "model" : "m/with:chars-1.2"}', "m/with:chars-1.2"),
        (json.dumps({"messages": [{"role": "user", "content": PROMPT}],
                     "model": "at-the-end", "max_tokens": 5}).encode(), "at-the-end"),
        (json.dumps({"model": "at-the-start",
                     "messages": [{"role": "user", "content": PROMPT}]}).encode(),
         "at-the-start"),
        (b'{"prompt": "\\"model\\": \\"fake\\""}', None),  # only inside a string: not a key
        (b'{"model": "esc\\u00e9aped"}', None),
        (b'{"model": 3}', None),
        (b'{"model": "' + b"x" * 257 + b'"}', None),
        (b'model=m', None),
        (b'["model", "m"]', None),
        (b"", None),
    ],
    ids=["first", "space", "later", "openai-sdk-order", "model-first", "in-string", "escape",
         "number", "too-long", "not-json", "array", "empty"],
)
def test_request_model(body: bytes, model: str | None) -> None:
    assert request_model(body) == model


def test_the_scan_is_bounded() -> None:
    """Past the head and before the tail of a large body, a key is not looked for."""
    middle = b'{"a": "' + b"x" * HEAD_BYTES + b'", "model": "m", "b": "' + b"y" * TAIL_BYTES
    assert request_model(middle + b'"}') is None
    assert request_model(middle[: -TAIL_BYTES // 2] + b'"}') == "m"
