"""What a request asks of an engine, read once from its JSON body: model, stream, token cost.

The scheduler needs three facts before it can place a request: the ``model`` it names (model
routing), whether it streams (an SSE heartbeat while it waits) and roughly how many tokens of
KV cache it will hold (token budgets). They come from one ``json.loads`` of the body, which is
in memory already; the edge does it only when one of those features is configured, since a
parse costs more than the rest of the proxy's work on a large chat request (the access log's
model comes from a bounded byte scan instead: :mod:`proxy.observe.model`).

The token cost is an estimate, by design: the proxy has no tokenizer. Text is counted in
characters and divided by a characters-per-token ratio (4 until a replica's ``usage`` says
otherwise, see :class:`TokenRatio`); token ids sent as integer lists are counted exactly. The
completion's share is ``max_tokens`` (or ``max_completion_tokens``), else the configured
default: an engine reserves KV room for what it may generate, not what it will.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

__all__ = ["CHARS_PER_TOKEN", "Demand", "TokenRatio", "parse_demand"]

#: The usual English ratio for BPE tokenizers; the starting point before any ``usage`` is seen.
CHARS_PER_TOKEN = 4.0

#: Bounds on a calibrated ratio: a replica that reports odd usage (0 tokens for a long prompt,
#: or a byte-level tokenizer) cannot make every estimate absurd.
RATIO_MIN = 1.0
RATIO_MAX = 16.0


@dataclass(frozen=True, slots=True)
class Demand:
    """The request's ask, as far as scheduling is concerned."""

    model: str | None
    stream: bool
    #: Characters of prompt text (``prompt``, ``messages`` contents, ``input``).
    prompt_chars: int = 0
    #: Prompt tokens sent as token ids (counted exactly, no ratio needed).
    prompt_ids: int = 0
    #: ``max_tokens`` or ``max_completion_tokens``; None if the request names neither.
    max_tokens: int | None = None

    def cost(self, default_max_tokens: int, chars_per_token: float = CHARS_PER_TOKEN) -> int:
        """Estimated tokens of KV cache: prompt estimate plus the completion's allowance."""
        prompt = self.prompt_ids + math.ceil(self.prompt_chars / chars_per_token)
        completion = self.max_tokens if self.max_tokens is not None else default_max_tokens
        return prompt + completion


#: A body that is not a JSON object: model-blind, not streaming, no known cost.
UNKNOWN = Demand(model=None, stream=False)


def parse_demand(body: bytes) -> Demand:
    """The :class:`Demand` of a request body; :data:`UNKNOWN` for anything not a JSON object.

    Never raises: a malformed body is the engine's to refuse (with its own 400), and
    hostile nesting that would exhaust the parser's recursion counts as no JSON.
    """
    if not body:
        return UNKNOWN
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return UNKNOWN
    if not isinstance(doc, dict):
        return UNKNOWN
    model = doc.get("model")
    chars, ids = 0, 0
    for key in ("prompt", "input"):
        c, i = _count(doc.get(key))
        chars += c
        ids += i
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                chars += _count_content(message.get("content"))
    return Demand(
        model=model if isinstance(model, str) else None,
        stream=doc.get("stream") is True,
        prompt_chars=chars,
        prompt_ids=ids,
        max_tokens=_max_tokens(doc),
    )


def _max_tokens(doc: dict[str, object]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens"):
        value = doc.get(key)
        # bool is an int in Python; `"max_tokens": true` is not a number of tokens.
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _count(value: object) -> tuple[int, int]:
    """(characters, token ids) of a ``prompt`` / ``input``: a string, token ids, or a list of
    either (a batch). Anything else counts as nothing."""
    if isinstance(value, str):
        return len(value), 0
    if not isinstance(value, list):
        return 0, 0
    chars, ids = 0, 0
    for item in value:
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, int):
            ids += 1
        elif isinstance(item, list):
            ids += sum(1 for token in item if isinstance(token, int))
    return chars, ids


def _count_content(content: object) -> int:
    """Characters of a chat message's ``content``: a string, or a list of parts whose text
    parts count (images and audio are the engine's business, not estimated here)."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):
                total += len(text)
    return total


class TokenRatio:
    """Characters per prompt token, calibrated from the ``usage`` replicas report.

    An exponentially weighted mean over requests (each weighted by its size, so a long prompt
    tells more than a short one), bounded to [:data:`RATIO_MIN`, :data:`RATIO_MAX`].
    Requests whose prompt was all token ids, or tiny, teach nothing and are ignored.
    """

    __slots__ = ("_chars", "_tokens", "decay")

    #: Prompts shorter than this (in characters) are not used: chat templates add a few
    #: tokens of their own, which swamp the ratio of a short prompt.
    MIN_CHARS = 200

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self._chars = 0.0
        self._tokens = 0.0

    @property
    def value(self) -> float:
        if self._tokens <= 0:
            return CHARS_PER_TOKEN
        return min(RATIO_MAX, max(RATIO_MIN, self._chars / self._tokens))

    def record(self, prompt_chars: int, prompt_tokens: int) -> None:
        """One answered request: its prompt's characters and the tokens usage reported."""
        if prompt_chars < self.MIN_CHARS or prompt_tokens <= 0:
            return
        self._chars = self._chars * self.decay + prompt_chars
        self._tokens = self._tokens * self.decay + prompt_tokens
