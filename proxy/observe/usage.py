"""Token counts read on the side from what a replica sends back.

OpenAI-compatible engines report ``usage: {prompt_tokens, completion_tokens}`` at the end of a
JSON answer, and in the last chunk of a stream when ``stream_options.include_usage`` is set.
vLLM's continuous usage stats put a cumulative ``usage`` in every chunk, so the *last* one is
the answer, never the sum. The relay feeds every chunk here *after* writing it to the caller;
only a bounded tail is kept, so memory per request stays constant however long the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Enough for the final usage chunk of any engine we know (a few hundred bytes), with room for
#: a trailing ``data: [DONE]`` or llama.cpp's ``timings`` object after ``usage``.
TAIL_BYTES = 16 * 1024

_KEY = b'"usage"'
_DECODER = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class UsageTail:
    """Keeps the last :data:`TAIL_BYTES` of a body; :meth:`usage` parses it once, at the end."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        tail = self._tail
        # Only a chunk's last TAIL_BYTES can matter: a large body is never copied whole.
        tail += chunk if len(chunk) <= TAIL_BYTES else chunk[-TAIL_BYTES:]
        # Trim in batches, not on every chunk: amortised O(1) per byte.
        if len(tail) > 2 * TAIL_BYTES:
            del tail[:-TAIL_BYTES]

    def usage(self) -> Usage | None:
        return find_usage(bytes(self._tail[-TAIL_BYTES:]))


def find_usage(data: bytes) -> Usage | None:
    """The last non-null ``usage`` object in ``data`` with integer token counts, if any."""
    end = len(data)
    while True:
        at = data.rfind(_KEY, 0, end)
        if at < 0:
            return None
        end = at
        found = _decode_at(data, at + len(_KEY))
        if found is not None:
            return found


def _decode_at(data: bytes, index: int) -> Usage | None:
    text = data[index : index + 1024].decode("utf-8", errors="replace")
    stripped = text.lstrip()
    if not stripped.startswith(":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(stripped[1:].lstrip())
    except (ValueError, RecursionError):
        # RecursionError: a value nested ~1,000 deep. Whatever a replica sends, it is at
        # worst "no usage", never an exception in the request's bookkeeping.
        return None
    if not isinstance(value, dict):
        return None  # "usage": null, as in every chunk but the last
    prompt = value.get("prompt_tokens", 0)
    completion = value.get("completion_tokens", 0)
    if not _count(prompt) or not _count(completion):
        return None
    return Usage(prompt, completion)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
