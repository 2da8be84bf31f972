"""Token counts read on the side from what a replica sends back.

OpenAI-compatible engines report ``usage: {prompt_tokens, completion_tokens}`` at the end of a
JSON answer, and in the last chunk of a stream when ``stream_options.include_usage`` is set.
vLLM's continuous usage stats put a cumulative ``usage`` in every chunk, so the *last* one is
the answer, never the sum. The relay feeds every chunk here *after* writing it to the caller;
only a bounded tail is kept, so memory per request stays constant however long the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from json.scanner import make_scanner

#: Enough for the final usage chunk of any engine we know (a few hundred bytes), with room for
#: a trailing ``data: [DONE]`` or llama.cpp's ``timings`` object after ``usage``.
TAIL_BYTES = 16 * 1024
#: Chunks held before they are joined (a stream of tiny ones stays a few objects).
_MAX_CHUNKS = 64

_KEY = b'"usage"'
_DECODER = json.JSONDecoder()
#: The scanner ``raw_decode`` calls (the decoder's own ``scan_once``): StopIteration where no
#: JSON value starts, ValueError if malformed.
_SCAN = make_scanner(_DECODER)  # type: ignore[arg-type]  # typeshed: any object with its fields
#: ``\s`` is exactly what ``str.lstrip()`` strips (both are Py_UNICODE_ISSPACE).
_COLON = re.compile(r"\s*:\s*")


@dataclass(slots=True)  # not frozen: a frozen one's __init__ is two object.__setattr__ calls
class Usage:
    prompt_tokens: int
    completion_tokens: int


class UsageTail:
    """Keeps the last :data:`TAIL_BYTES` of a body; :meth:`usage` parses it once, at the end.

    The chunks themselves are kept, not copied into a buffer: most answers are one chunk
    (a JSON body) or a few dozen (a stream), parsed as they are.
    """

    __slots__ = ("_chunks", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        # Only a chunk's last TAIL_BYTES can matter: a large body is never kept whole.
        if len(chunk) > TAIL_BYTES:
            chunk = chunk[-TAIL_BYTES:]
        chunks = self._chunks
        chunks.append(chunk)
        self._size += len(chunk)
        # Trimmed in batches, not on every chunk: amortised O(1) per byte, and at most
        # _MAX_CHUNKS small objects held however tiny the chunks.
        if self._size > 2 * TAIL_BYTES or len(chunks) > _MAX_CHUNKS:
            kept = b"".join(chunks)[-TAIL_BYTES:]
            self._chunks = [kept]
            self._size = len(kept)

    @property
    def held(self) -> int:
        """Bytes held (at most 2 x :data:`TAIL_BYTES`)."""
        return self._size

    def usage(self) -> Usage | None:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return find_usage(data[-TAIL_BYTES:])  # the whole of a short one: no copy


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
    text = data[index : index + 1024].decode("utf-8", "replace")
    colon = _COLON.match(text)  # whitespace, ":", whitespace, as str.lstrip() sees them
    if colon is None:
        return None
    try:
        # raw_decode's scanner itself, at the value: no Python frame, no copy of the text
        value, _ = _SCAN(text, colon.end())
    except (ValueError, RecursionError, StopIteration):
        # RecursionError: a value nested ~1,000 deep. Whatever a replica sends, it is at
        # worst "no usage", never an exception in the request's bookkeeping.
        return None
    if not isinstance(value, dict):
        return None  # "usage": null, as in every chunk but the last
    prompt = value.get("prompt_tokens", 0)
    completion = value.get("completion_tokens", 0)
    # Counts: JSON integers >= 0 (a decoded int is exactly int; True and 1.0 are not).
    if type(prompt) is not int or prompt < 0 or type(completion) is not int or completion < 0:
        return None
    return Usage(prompt, completion)
