"""Completions and chats, plain and streamed, reach the caller exactly as the engine sent them.

Sampling is greedy (``temperature: 0``) and the prompt cache is off, so an engine gives the
same tokens to the same request every time: the answer through batchgate must equal the
answer straight from the engine, delta for delta. The tiny model never samples an end token,
so every answer is exactly ``max_tokens`` long and ends with ``finish_reason: "length"``.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.e2e.harness import Stack

pytestmark = pytest.mark.e2e

MODEL = "tiny-llama"  # llama-server serves its one model whatever the name
MAX_TOKENS = 48
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": {"cache_prompt": False}}
MESSAGES: list[Any] = [{"role": "user", "content": "hello world, write one line"}]
PROMPT = "the batch gate model server"


async def test_models_list_is_the_engines(
    sdk: AsyncOpenAI, direct: AsyncOpenAI
) -> None:
    via = [m.id for m in (await sdk.models.list()).data]
    ref = [m.id for m in (await direct.models.list()).data]
    assert via == ref
    assert len(via) == 1 and via[0].endswith("tiny-llama.gguf")


async def test_plain_completion_is_the_engines_answer(
    sdk: AsyncOpenAI, direct: AsyncOpenAI
) -> None:
    via = await sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, **GREEDY
    )
    ref = await direct.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, **GREEDY
    )
    assert via.usage is not None and via.usage.completion_tokens == MAX_TOKENS
    assert via.choices[0].finish_reason == "length"
    assert via.choices[0].text.strip()
    assert via.choices[0].text == ref.choices[0].text


async def test_plain_chat_is_the_engines_answer(
    sdk: AsyncOpenAI, direct: AsyncOpenAI
) -> None:
    via = await sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY
    )
    ref = await direct.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY
    )
    assert via.usage is not None and via.usage.completion_tokens == MAX_TOKENS
    assert via.choices[0].finish_reason == "length"
    assert via.choices[0].message.role == "assistant"
    assert (via.choices[0].message.content or "").strip()
    assert via.choices[0].message.content == ref.choices[0].message.content


async def streamed_chat(client: AsyncOpenAI) -> tuple[list[str], str | None, int | None]:
    """Content deltas in arrival order, the finish reason, and the usage chunk's tokens."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    deltas: list[str] = []
    finish: str | None = None
    tokens: int | None = None
    async for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            if choice.delta.content:
                deltas.append(choice.delta.content)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return deltas, finish, tokens


async def test_streamed_chat_with_usage_is_the_engines_stream(
    sdk: AsyncOpenAI, direct: AsyncOpenAI
) -> None:
    via, finish, tokens = await streamed_chat(sdk)
    assert (len(via), finish, tokens) == (MAX_TOKENS, "length", MAX_TOKENS)
    ref, _, _ = await streamed_chat(direct)
    assert via == ref  # one delta per token, none merged, split or lost
    plain = await direct.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **GREEDY
    )
    assert "".join(via) == plain.choices[0].message.content


async def streamed_completion(client: AsyncOpenAI) -> tuple[list[str], str | None]:
    stream = await client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True, **GREEDY
    )
    texts: list[str] = []
    finish: str | None = None
    async for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].text:
                texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    return texts, finish


async def test_streamed_completion_is_the_engines_stream(
    sdk: AsyncOpenAI, direct: AsyncOpenAI
) -> None:
    via, finish = await streamed_completion(sdk)
    assert (len(via), finish) == (MAX_TOKENS, "length")
    ref, _ = await streamed_completion(direct)
    assert via == ref


async def test_event_stream_bytes_are_well_formed(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """What the SDK hides: headers, framing and the final ``[DONE]`` survive the proxy."""
    body = {"prompt": PROMPT, "max_tokens": 8, "stream": True}
    async with http.post(
        stack.batchgate.url + "/v1/completions", json=body, headers={"X-Request-Id": "e2e-42"}
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Request-Id"] == "e2e-42"
        assert "Keep-Alive" not in r.headers  # hop-by-hop: the engine's, not the caller's
        raw = await r.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b"", raw[-100:]  # the body ends exactly at an event boundary
    assert events[-2] == b"data: [DONE]"
    data = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    assert sum(1 for d in data if d["choices"] and d["choices"][0]["text"]) == 8
