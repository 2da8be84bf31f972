"""Token usage read from the tail of an answer: the last usage wins, memory stays bounded."""

from __future__ import annotations

import json

from proxy.observe.usage import TAIL_BYTES, Usage, UsageTail, find_usage


def chunk(usage: object, text: str = "x") -> bytes:
    body = {"choices": [{"delta": {"content": text}}], "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def test_plain_json_body() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}})
    assert find_usage(body.encode()) == Usage(4, 9)


def test_last_non_null_usage_wins_never_the_sum() -> None:
    stream = b"".join(
        [chunk(None), *(chunk({"prompt_tokens": 5, "completion_tokens": i}) for i in (1, 2, 3)),
         chunk(None), b"data: [DONE]\n\n"]
    )
    assert find_usage(stream) == Usage(5, 3)


def test_usage_split_across_chunks_and_long_streams_stay_bounded() -> None:
    tail = UsageTail()
    for _ in range(5000):
        tail.feed(chunk(None, "token "))
        assert tail.held <= 2 * TAIL_BYTES + 200
    final = chunk({"prompt_tokens": 11, "completion_tokens": 5000})
    tail.feed(final[:17])
    tail.feed(final[17:])
    tail.feed(b"data: [DONE]\n\n")
    assert tail.usage() == Usage(11, 5000)


def test_no_usage_or_malformed() -> None:
    assert find_usage(b"") is None
    assert find_usage(chunk(None)) is None
    assert find_usage(b'{"usage": {"prompt_tokens": "7"}}') is None
    assert find_usage(b'{"usage": {"prompt_tokens": true, "completion_tokens": 1}}') is None
    assert find_usage(b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2') is None
    assert find_usage(b'"usage" is a word, {"usage": {"completion_tokens": 2}}') == Usage(0, 2)


def test_usage_nested_too_deep_for_the_decoder_is_no_usage() -> None:
    deep = b'{"usage": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert find_usage(deep) is None
    nested = b'{"usage": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001
    assert find_usage(nested) is None


def test_byte_by_byte_feeds_find_the_usage_and_stay_bounded() -> None:
    tail = UsageTail()
    body = chunk(None, "token ") * 400 + chunk({"prompt_tokens": 3, "completion_tokens": 400})
    for i in range(len(body)):
        tail.feed(body[i : i + 1])
        assert tail.held <= 2 * TAIL_BYTES
    assert tail.usage() == Usage(3, 400)
